"""Write a Hugging Face Llama directory that ``AutoModelForCausalLM`` and ``AutoTokenizer`` load.

Files: ``config.json``, ``generation_config.json``, ``model.safetensors`` (or
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` above the size cap),
and, with a tokenizer, ``tokenizer.model`` + ``tokenizer_config.json`` +
``special_tokens_map.json``, from which transformers builds its (fast) Llama tokenizer.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from megatrain.config import ModelConfig
from megatrain.convert.source import ConversionError, Source, normalize_hf_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DEFAULT_MAX_SHARD = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (KB/MB/GB decimal, KiB/MiB/GiB binary, a bare number is bytes)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ConversionError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _arch(cfg: ModelConfig) -> tuple:
    """What makes two configs the same network (init and dropout settings excluded)."""
    return (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.kv_heads, cfg.ffn_size, cfg.vocab_size,
            cfg.norm_eps, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len, cfg.tie_embeddings)


def build_hf_config(src: Source, dtype: torch.dtype, tok: Any) -> dict:
    """config.json: the source's own HF config when it describes the same network (a round trip keeps
    every field), else one generated from the ModelConfig."""
    from megatrain.model.hf import hf_config_dict

    name = HF_DTYPE_NAMES[dtype]
    if src.hf_config is not None:
        try:
            same = _arch(normalize_hf_config(src.hf_config, src.path)) == _arch(src.model)
        except Exception:  # a recorded config we cannot read is simply not reused
            same = False
        if same:
            out = dict(src.hf_config)
            for key in ("torch_dtype", "dtype"):
                if key in out:
                    out[key] = name
            return out
    bos, eos = (tok.bos_id, tok.eos_id) if tok is not None else (1, 2)
    out = hf_config_dict(src.model, dtype=name, bos_id=bos, eos_id=eos)
    out["dtype"] = name  # transformers >= 5 reads "dtype"; older versions read "torch_dtype"
    if tok is not None and tok.pad_id >= 0:
        out["pad_token_id"] = tok.pad_id
    return out


def build_generation_config(hf_config: dict) -> dict:
    out = {"_from_model_config": True, "bos_token_id": hf_config.get("bos_token_id"),
           "eos_token_id": hf_config.get("eos_token_id")}
    if hf_config.get("pad_token_id") is not None:
        out["pad_token_id"] = hf_config["pad_token_id"]
    return out


def source_generation_config(src: Source) -> Optional[dict]:
    """The generation_config.json that came with an HF source (kept through megatrain in meta.json)."""
    if src.kind == "hf":
        path = src.path / "generation_config.json"
        return json.loads(path.read_text()) if path.is_file() else None
    return (src.meta.get("source") or {}).get("hf_generation_config")


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped in order into files of at most ``max_bytes`` (a larger tensor gets its own)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if groups[-1] and used + n > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += n
    return groups


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_hf_weights(out: Path, tensors: dict[str, torch.Tensor], max_bytes: int,
                     advance: Callable[[int], None]) -> int:
    """Safetensors file(s) plus the index when there is more than one; returns the bytes written."""
    from megatrain.files import save_safetensors

    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    groups = plan_shards(sizes, max_bytes)
    names = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for fname, group in zip(names, groups):
        save_safetensors({n: tensors[n].contiguous() for n in group}, out / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
        advance(len(group))
    if len(groups) > 1:
        _write_json(out / "model.safetensors.index.json",
                    {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
    return sum(sizes.values())


def write_hf_tokenizer(out: Path, tok_path: Path, tok: Any, max_len: int) -> None:
    shutil.copyfile(tok_path, out / "tokenizer.model")
    special = {"bos_token": tok.id_to_piece(tok.bos_id), "eos_token": tok.id_to_piece(tok.eos_id),
               "unk_token": tok.id_to_piece(tok.unk_id)}
    if tok.pad_id >= 0:
        special["pad_token"] = tok.id_to_piece(tok.pad_id)
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "pad_token": None, **special, "model_max_length": max_len, "legacy": False,
              "clean_up_tokenization_spaces": False, "sp_model_kwargs": {}, "spaces_between_special_tokens": False}
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special)


def cast_weights(weights: dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    if dtype is None:
        return dict(weights)
    return {n: t.to(dtype) if t.is_floating_point() else t for n, t in weights.items()}


def write_hf(out: Path, src: Source, dtype: torch.dtype, max_bytes: int, tok_path: Optional[Path], tok: Any,
             advance: Callable[[int], None]) -> int:
    """Write the whole HF directory into ``out`` (an empty directory); returns the weight bytes."""
    from megatrain.model.hf import to_hf_state_dict

    hf = to_hf_state_dict(cast_weights(src.weights, dtype), src.model)
    written = write_hf_weights(out, hf, max_bytes, advance)
    hf_config = build_hf_config(src, dtype, tok)
    _write_json(out / "config.json", hf_config)
    _write_json(out / "generation_config.json", source_generation_config(src) or build_generation_config(hf_config))
    if tok_path is not None:
        write_hf_tokenizer(out, tok_path, tok, src.model.max_seq_len)
    return written
