"""Reading a conversion source: a megatrain checkpoint or a Hugging Face Llama directory.

Either becomes a :class:`Source`: canonical full tensors, the ModelConfig, a megatrain
Config dict, and the tokenizer file when one can be found. Pickle inputs
(``pytorch_model.bin``) are read with ``weights_only=True``; anything else in them is refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from megatrain.checkpoint import layout
from megatrain.checkpoint.select import resolve_checkpoint_dir
from megatrain.config import Config, ConfigError, ModelConfig, validate_model

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"
_HF_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                    "pytorch_model.bin")
# HF tensors that carry no weights (RoPE tables some old exports saved).
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(RuntimeError):
    """A conversion that cannot proceed as asked; the message names the input and what to do."""


@dataclass
class Source:
    """What a converter needs from its input, independent of the input's format."""

    kind: str  # "megatrain" | "hf"
    path: Path
    model: ModelConfig
    config: dict  # a megatrain Config dict (resolved)
    weights: dict[str, torch.Tensor]  # canonical full tensors
    meta: dict = field(default_factory=dict)  # megatrain meta.json (empty for HF)
    hf_config: Optional[dict] = None  # the HF config.json, when the source is (or came from) one
    tokenizer: Optional[Path] = None

    def describe(self) -> str:
        if self.kind == "megatrain":
            t = self.meta.get("topology", {})
            return f"megatrain[step {self.meta.get('step')}, tp={t.get('tp')} pp={t.get('pp')}]"
        return "hf"

    @property
    def dtype(self) -> torch.dtype:
        floats = [t.dtype for t in self.weights.values() if t.is_floating_point()]
        return max(floats, key=lambda d: torch.finfo(d).bits) if floats else torch.float32


# --------------------------------------------------------------------------- detection


def is_hf_dir(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    return any((path / f).is_file() for f in _HF_WEIGHT_FILES) or any(path.glob("*.safetensors"))


def detect_kind(path: Path) -> str:
    """'hf' or 'megatrain'; a path that is neither raises naming what was expected."""
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory")
    if path.is_dir() and is_hf_dir(path):
        return "hf"
    if path.is_dir() and (path / "config.json").is_file() and not (path / layout.META).exists():
        raise ConversionError(f"{path}: has a config.json but no weights (model.safetensors, model-*.safetensors "
                              f"or pytorch_model.bin); the download is incomplete")
    resolve_checkpoint_dir(path, verify="off")  # raises CheckpointError saying what a checkpoint looks like
    return "megatrain"


def load_source(path: Any, kind: str = "auto", tokenizer: Optional[Any] = None, verify: str = "sizes") -> Source:
    """Read ``path`` (kind auto | megatrain | hf). ``tokenizer`` overrides the tokenizer found with it."""
    path = Path(path)
    kind = detect_kind(path) if kind == "auto" else kind
    src = _load_megatrain(path, verify) if kind == "megatrain" else load_hf_dir(path)
    src.tokenizer = find_tokenizer(src, Path(tokenizer) if tokenizer else None)
    return src


# --------------------------------------------------------------------------- megatrain


def load_source_for_rank(path: Any, tp_rank: int, tp: int, tokenizer: Optional[Any] = None,
                         verify: str = "sizes") -> Source:
    """Like :func:`load_source`, but ``weights`` holds only this TP rank's slices, cut for ``tp``
    (``LlamaModel(tp_group of size tp).state_dict()`` names and shapes): what a tensor-parallel
    reader such as ``megatrain-generate`` loads. A megatrain checkpoint is re-cut one tensor at a
    time; an HF directory is read whole and cut."""
    path = Path(path)
    if detect_kind(path) == "megatrain":
        ckpt = resolve_checkpoint_dir(path, verify)
        meta, weights = layout.load_weights_for_rank(ckpt, tp_rank, tp, verify=verify)
        cfg = layout.model_config_of(meta, ckpt)
        src = Source("megatrain", ckpt, cfg, meta["config"], weights, meta, (meta.get("source") or {}).get("hf_config"))
    else:
        src = load_hf_dir(path)
        if tp > 1:
            src.weights = cut_for_tp(src.weights, src.model, tp_rank, tp)
    src.tokenizer = find_tokenizer(src, Path(tokenizer) if tokenizer else None)
    return src


def cut_for_tp(weights: dict[str, torch.Tensor], cfg: ModelConfig, tp_rank: int, tp: int) -> dict[str, torch.Tensor]:
    """This TP rank's slices of canonical full tensors (the split ``layout.split_for_topology`` writes)."""
    dims = {n: d for n, (_, d) in layout.model_layout(cfg).items()}
    out = {}
    for name, t in weights.items():
        d = dims.get(name)
        if d is not None and t.shape[d] % tp:
            raise ConfigError(f"{name}: dimension {d} of {tuple(t.shape)} is not divisible by {tp} ranks; "
                              f"run on a number of ranks that divides it")
        out[name] = t if d is None else t.chunk(tp, dim=d)[tp_rank].contiguous()
    return out


def _load_megatrain(path: Path, verify: str) -> Source:
    ckpt = resolve_checkpoint_dir(path, verify)  # the checkpoint megatrain-train would resume from
    meta, weights = layout.load_canonical_weights(ckpt, verify=verify)
    cfg = layout.model_config_of(meta, ckpt)
    hf_config = (meta.get("source") or {}).get("hf_config")
    return Source("megatrain", ckpt, cfg, meta["config"], weights, meta, hf_config)


# --------------------------------------------------------------------------- Hugging Face


def normalize_hf_config(hc: dict, where: Path) -> ModelConfig:
    """ModelConfig from an HF config.json, refusing what megatrain's LLaMA cannot represent."""
    from megatrain.model.hf import model_config_from_hf

    hc = dict(hc)
    if hc.get("quantization_config"):
        raise ConfigError(f"{where}: quantization_config is set (quantized weights); convert an unquantized "
                          f"(fp32/bf16/fp16) checkpoint")
    archs = hc.get("architectures") or ["LlamaForCausalLM"]
    if archs != ["LlamaForCausalLM"]:
        raise ConfigError(f"{where}: architectures={archs}; only LlamaForCausalLM is supported")
    for key, ok in (("pretraining_tp", (None, 1)), ("sliding_window", (None,)), ("rope_interleaved", (None, False))):
        if hc.get(key) not in ok:
            raise ConfigError(f"{where}: {key}={hc[key]!r} is not supported by megatrain's LLaMA")
    # transformers 5 writes RoPE settings under rope_parameters; model_config_from_hf reads rope_scaling.
    rp = hc.get("rope_parameters")
    if isinstance(rp, dict) and rp.get("rope_type", "default") != "default" and not hc.get("rope_scaling"):
        hc["rope_scaling"] = rp
    try:
        cfg = model_config_from_hf(hc)
        validate_model(cfg)  # the ranges and shape rules of a megatrain model config
        return cfg
    except KeyError as e:
        raise ConfigError(f"{where}: required field {e} is missing") from None
    except (ConfigError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ConfigError(f"{where}: {e} (a field of config.json is missing, null or out of range)") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e}); the download may be incomplete") from None


def read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: safetensors (single or sharded) or, failing that, torch pickles
    loaded with ``weights_only=True``."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = _index_files(index)
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if files:
        out: dict[str, torch.Tensor] = {}
        for f in files:
            if not (path / f).is_file():
                raise ConversionError(f"{path / f}: listed in {index.name} but missing; the download is incomplete")
            try:
                out.update(load_file(str(path / f)))
            except Exception as e:  # safetensors' own error types: truncated header, bad offsets, ...
                raise ConversionError(f"{path / f}: not a readable safetensors file ({e}); the download may be "
                                      f"incomplete") from None
        return out
    return _read_torch_pickles(path)


def _index_files(index: Path) -> list[str]:
    weight_map = _read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConversionError(f"{index}: needs a weight_map object of tensor name -> file name")
    return sorted(set(weight_map.values()))


def _read_torch_pickles(path: Path) -> dict[str, torch.Tensor]:
    index = path / "pytorch_model.bin.index.json"
    files = _index_files(index) if index.is_file() else ["pytorch_model.bin"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd = torch.load(path / f, map_location="cpu", weights_only=True, mmap=True)
        except FileNotFoundError:
            raise ConversionError(f"{path / f}: missing; no weights found in {path}") from None
        except Exception as e:  # unpickling refused: the file holds more than tensors
            raise ConversionError(f"{path / f}: refused to load ({e.__class__.__name__}); only plain tensor "
                                  f"pickles are read (weights_only=True). Re-save it as safetensors.") from None
        out.update(sd)
    return out


def _hf_expected_names(cfg: ModelConfig) -> set[str]:
    from megatrain.model.hf import to_hf_state_dict

    sd = {n: torch.empty(shape, device="meta") for n, (shape, _) in layout.model_layout(cfg).items()}
    return set(to_hf_state_dict(sd, cfg)) | {"lm_head.weight"}


def load_hf_dir(path: Path) -> Source:
    from megatrain.model.hf import from_hf_state_dict

    hc = _read_json(path / "config.json")
    if not isinstance(hc, dict):
        raise ConversionError(f"{path / 'config.json'}: the top level must be a JSON object (a transformers config)")
    cfg = normalize_hf_config(hc, path / "config.json")
    hf = read_hf_tensors(path)
    unexpected = sorted(n for n in set(hf) - _hf_expected_names(cfg) if not n.endswith(_IGNORED_HF_SUFFIXES))
    if unexpected:
        raise ConversionError(f"{path}: tensor {unexpected[0]} (and {len(unexpected) - 1} more) is not part of a "
                              f"plain Llama with this config.json; the checkpoint uses a feature megatrain does "
                              f"not support")
    try:
        weights = from_hf_state_dict(hf, cfg)
    except ConfigError as e:
        raise ConversionError(f"{path}: {e}") from None
    for name, t in weights.items():
        if t.is_floating_point() is False:
            raise ConversionError(f"{path}: tensor for {name} has dtype {t.dtype}; expected floating point weights")
    config = Config(model=cfg).to_dict()
    return Source("hf", path, cfg, config, {k: v.contiguous() for k, v in weights.items()}, {}, hc)


# --------------------------------------------------------------------------- tokenizer


def _tokenizer_candidates(src: Source) -> list[Path]:
    if src.kind == "hf":
        return [src.path / TOKENIZER_FILE]
    cands = [src.path / TOKENIZER_FILE]
    run_dir = src.path.parent.parent
    for p in (src.meta.get("tokenizer_path"), (src.config.get("data") or {}).get("tokenizer")):
        if p:
            cands += [Path(p), run_dir / p]
    return cands


def find_tokenizer(src: Source, explicit: Optional[Path]) -> Optional[Path]:
    """The sentencepiece model for ``src``: ``explicit``, else one shipped with or recorded in the source.
    A tokenizer whose SHA-256 differs from the one the checkpoint recorded is refused."""
    want = src.meta.get("tokenizer_sha256")
    if explicit is not None:
        if not explicit.is_file():
            raise ConversionError(f"--tokenizer {explicit}: no such file")
        _check_hash(explicit, want, "--tokenizer")
        return explicit
    for cand in _tokenizer_candidates(src):
        if cand.is_file():
            _check_hash(cand, want, "the recorded tokenizer")
            return cand
    return None


def _check_hash(path: Path, want: Optional[str], what: str) -> None:
    import hashlib

    if want is None:
        return
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    if got != want:
        raise ConversionError(f"{what} {path} has SHA-256 {got[:12]}..., but the checkpoint was trained with "
                              f"{want[:12]}...; pass the tokenizer it was trained with (--tokenizer PATH)")


def load_tokenizer(path: Path, cfg: ModelConfig, allow_padded_vocab: bool = False) -> Any:
    """megatrain's Tokenizer for ``path``, checked against the embedding size.

    Training accepts a tokenizer smaller than the embedding (a vocabulary padded for TP); exports do
    so only when asked, because the extra rows then have no text (GGUF gets ``[PADn]`` pieces)."""
    from megatrain.data.tokenizer import Tokenizer

    try:
        tok = Tokenizer(str(path))
    except Exception as e:  # DataFormatError and sentencepiece's own errors
        raise ConversionError(f"{path}: cannot load the tokenizer ({e})") from None
    n, rows = tok.vocab_size, cfg.vocab_size
    if n > rows or (n < rows and not allow_padded_vocab):
        hint = " or, if the vocabulary was padded on purpose, --allow-padded-vocab" if n < rows else ""
        raise ConversionError(f"tokenizer {path} has {n} pieces but the model's embedding has {rows} rows; pass the "
                              f"tokenizer the model was trained with (--tokenizer PATH){hint}")
    return tok
