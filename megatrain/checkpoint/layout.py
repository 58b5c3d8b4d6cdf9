"""The on-disk layout of a megatrain checkpoint: names, model shards, meta, manifest, completion.

Torch-free formats only (safetensors for tensors, JSON for everything else), so that a
checkpoint can be inspected, verified and converted without unpickling anything::

    RUN_DIR/checkpoints/
      latest                         tag of the newest complete checkpoint ("step_00000100")
      step_00000100/
        meta.json                    step, samples, resolved config, fingerprints, topology, ...
        model/tp00_pp00.safetensors  one per (tp_rank, pp_rank): canonical names, this rank's TP shard
        optim/ ...  rng/ ...         AdamW state (optim_state.py) and RNG states (not read here)
        manifest.json                {"files": {relpath: {"size", "sha256"}}} of every other file
        COMPLETE                     written last: a directory without it is never loaded

Canonical names are those of ``LlamaModel.state_dict()`` with the global block index; a
tied embedding is stored once, as ``embed.embed.weight``. Every file is written under a
temporary name and renamed, so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from megatrain.files import atomic_path, atomic_write_bytes, atomic_write_json, replace_dir, sha256_files

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

FORMAT = "megatrain-checkpoint"
VERSION = 2  # 2: no ds/ (each tensor once); 1 (still read): ds/ next to model/ and optim/
META = "meta.json"
MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
LATEST = "latest"
MODEL_DIR = "model"
VERIFY_LEVELS = ("off", "sizes", "full")
REQUIRED_META = ("step", "consumed_samples", "weights_only", "config", "topology")
_TAG_RE = re.compile(r"^step_(\d{8,})$")
_SHARD_RE = re.compile(r"^tp(\d{2,})_pp(\d{2,})\.safetensors$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as it is; the message names the file and what to do."""


# --------------------------------------------------------------------------- names


def tag_for_step(step: int) -> str:
    """``step_00000100``: zero-padded so that names sort in step order."""
    if int(step) < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{int(step):08d}"


def step_of_tag(tag: str) -> Optional[int]:
    """The step of a tag made by :func:`tag_for_step`, None for any other name."""
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def shard_path(ckpt_dir: PathLike, tp_rank: int, pp_rank: int) -> Path:
    return Path(ckpt_dir) / MODEL_DIR / f"tp{tp_rank:02d}_pp{pp_rank:02d}.safetensors"


# --------------------------------------------------------------------------- reading


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no {what}; {path.parent} is not a (complete) megatrain checkpoint directory "
                              f"(expected RUN_DIR/checkpoints/step_XXXXXXXX)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt {what} ({e}); use another checkpoint") from None


# --------------------------------------------------------------------------- model shards


def write_model_shard(ckpt_dir: PathLike, tp_rank: int, pp_rank: int, tensors: dict[str, torch.Tensor],
                      tp: int, pp: int) -> None:
    """Write one (tp_rank, pp_rank) shard: canonical names -> this rank's TP slices, in safetensors."""
    from megatrain.files import save_safetensors

    if not (0 <= tp_rank < tp and 0 <= pp_rank < pp):
        raise ValueError(f"shard (tp_rank={tp_rank}, pp_rank={pp_rank}) outside tp={tp}, pp={pp}")
    path = shard_path(ckpt_dir, tp_rank, pp_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _cpu_unshared(tensors)
    meta = {"tp_rank": str(tp_rank), "pp_rank": str(pp_rank), "tp": str(tp), "pp": str(pp), "format": "pt"}
    with atomic_path(path, fsync=True) as tmp:
        save_safetensors(data, tmp, metadata=meta)


def _cpu_unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; safetensors refuses two tensors over one storage, so such copies are cloned."""
    seen, out = set(), {}
    for n, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n}: expected a tensor, got {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[n] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _shard_files(ckpt_dir: Path) -> dict[tuple[int, int], Path]:
    out = {}
    model_dir = ckpt_dir / MODEL_DIR
    for p in sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []:
        m = _SHARD_RE.match(p.name)
        if m:
            out[(int(m.group(1)), int(m.group(2)))] = p
    return out


def _check_shard_set(ckpt_dir: Path, meta: dict) -> dict[tuple[int, int], Path]:
    """Every (tp_rank, pp_rank) file that meta's topology promises is present, and nothing else."""
    topo = meta.get("topology") or {}
    tp, pp = int(topo.get("tp", 1)), int(topo.get("pp", 1))
    files = _shard_files(ckpt_dir)
    if not files:
        raise CheckpointError(f"{ckpt_dir / MODEL_DIR}: no model shards (tpXX_ppYY.safetensors); the checkpoint "
                              f"holds no megatrain weights")
    want = {(t, p) for t in range(tp) for p in range(pp)}
    missing = sorted(want - set(files))
    if missing:
        names = ", ".join(shard_path(ckpt_dir, t, p).name for t, p in missing[:4])
        raise CheckpointError(f"{ckpt_dir / MODEL_DIR}: missing shard(s) {names} for topology tp={tp} pp={pp}; "
                              f"the checkpoint is incomplete, use another one")
    extra = sorted(set(files) - want)
    if extra:
        raise CheckpointError(f"{files[extra[0]]}: shard outside the topology tp={tp} pp={pp} in {META}; "
                              f"the directory mixes two checkpoints")
    return files


# --------------------------------------------------------------------------- meta


def write_meta(ckpt_dir: PathLike, meta: dict) -> None:
    """Write ``meta.json``; ``format``, ``version`` and ``megatrain_version`` are filled in when absent."""
    import megatrain

    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"meta for {ckpt_dir}: missing key(s) {missing}")
    full = {"format": FORMAT, "version": VERSION, "megatrain_version": megatrain.__version__, **meta}
    atomic_write_json(Path(ckpt_dir) / META, full)


def read_meta(ckpt_dir: PathLike) -> dict:
    path = Path(ckpt_dir) / META
    meta = _read_json(path, META)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format is {meta.get('format') if isinstance(meta, dict) else None!r}, "
                              f"expected {FORMAT!r}; not a megatrain checkpoint")
    if int(meta.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta['version']} is newer than this megatrain "
                              f"reads ({VERSION}); upgrade megatrain")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: missing field(s) {missing}; the file is damaged, use another checkpoint")
    return meta


def model_config_of(meta: dict, ckpt_dir: PathLike = "") -> Any:
    """The ModelConfig recorded in a checkpoint's meta."""
    from megatrain.config import Config, ConfigError

    try:
        return Config.from_dict(meta["config"]).model
    except (ConfigError, TypeError, KeyError) as e:
        raise CheckpointError(f"{Path(ckpt_dir) / META}: recorded config is not readable by this megatrain "
                              f"({e})") from None


# --------------------------------------------------------------------------- manifest


def _payload_files(ckpt_dir: Path) -> list[str]:
    out = []
    for root, _, files in os.walk(ckpt_dir):
        for name in files:
            rel = (Path(root) / name).relative_to(ckpt_dir).as_posix()
            if rel not in (MANIFEST, COMPLETE):
                out.append(rel)
    return sorted(out)


def write_manifest(ckpt_dir: PathLike) -> None:
    """Record size and SHA-256 of every file in the checkpoint (but the manifest and COMPLETE)."""
    ckpt_dir = Path(ckpt_dir)
    rels = _payload_files(ckpt_dir)
    digests = sha256_files([ckpt_dir / r for r in rels])
    files = {r: {"size": (ckpt_dir / r).stat().st_size, "sha256": d} for r, d in zip(rels, digests)}
    atomic_write_json(ckpt_dir / MANIFEST, {"files": files})


def verify_manifest(ckpt_dir: PathLike, level: str = "sizes") -> None:
    """off: nothing; sizes: every listed file exists with its size; full: and its SHA-256 matches."""
    if level not in VERIFY_LEVELS:
        raise ValueError(f"verify level {level!r}: choose one of {', '.join(VERIFY_LEVELS)}")
    if level == "off":
        return
    ckpt_dir = Path(ckpt_dir)
    manifest = _read_json(ckpt_dir / MANIFEST, MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{ckpt_dir / MANIFEST}: no 'files' table; the manifest is damaged")
    for rel, entry in sorted(files.items()):
        path = ckpt_dir / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {MANIFEST} but missing; the checkpoint is damaged, "
                                  f"use another one")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {entry['size']}; the file is truncated "
                                  f"or was modified, use another checkpoint")
    if level == "full":
        rels = sorted(files)
        for rel, digest in zip(rels, sha256_files([ckpt_dir / r for r in rels])):
            if digest != files[rel]["sha256"]:
                raise CheckpointError(f"{ckpt_dir / rel}: SHA-256 differs from {MANIFEST}; the file is corrupt, "
                                      f"use another checkpoint")


# --------------------------------------------------------------------------- completion and discovery


def mark_complete(ckpt_dir: PathLike) -> None:
    """Write ``COMPLETE`` last: from here on the directory may be loaded."""
    ckpt_dir = Path(ckpt_dir)
    atomic_write_json(ckpt_dir / COMPLETE, {"completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def is_complete(ckpt_dir: PathLike) -> bool:
    return (Path(ckpt_dir) / COMPLETE).is_file()


def update_latest(ckpt_root: PathLike, tag: str) -> None:
    """Point ``latest`` at ``tag``; refuses a tag whose directory is not complete."""
    ckpt_root = Path(ckpt_root)
    if not is_complete(ckpt_root / tag):
        raise CheckpointError(f"{ckpt_root / tag}: not a complete checkpoint; {LATEST} must only name complete ones")
    atomic_write_bytes(ckpt_root / LATEST, (tag + "\n").encode())


def list_checkpoints(ckpt_root: PathLike, complete_only: bool = True) -> list[Path]:
    """``step_*`` directories under ``ckpt_root``, oldest first."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    found = [(step_of_tag(p.name), p) for p in ckpt_root.iterdir() if p.is_dir()]
    found = [(s, p) for s, p in found if s is not None and (not complete_only or is_complete(p))]
    return [p for _, p in sorted(found)]


# --------------------------------------------------------------------------- loading


def _open_checked(ckpt_dir: PathLike, verify: str) -> tuple[Path, dict, dict[tuple[int, int], Path]]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: not a directory; pass a checkpoint directory (RUN_DIR/checkpoints/step_N)")
    if not is_complete(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: partial checkpoint (no {COMPLETE} marker: the save was interrupted or "
                              f"is still running); use an older checkpoint or the one {LATEST} names")
    meta = read_meta(ckpt_dir)
    verify_manifest(ckpt_dir, verify)
    return ckpt_dir, meta, _check_shard_set(ckpt_dir, meta)


def model_layout(cfg: Any) -> dict[str, tuple[tuple[int, ...], Optional[int]]]:
    """Canonical name -> (full shape, TP partition dim or None), read off a model built on 'meta'.

    The model is built with device='meta' but *not* under ``with torch.device('meta')``: that context
    would also move RoPE's table computation to meta tensors, whose first use imports PyTorch's
    Python decompositions (seconds of start-up for a command-line tool)."""
    from megatrain.model.llama import Ctx, LlamaModel

    model = LlamaModel(cfg, Ctx(device=torch.device("meta")))
    return {n: (tuple(p.shape), getattr(p, "partition_dim", None)) for n, p in model.named_parameters()}


def _same_copy(a: torch.Tensor, b: torch.Tensor, what: str) -> bool:
    """Replicated copies should be bitwise equal; a last-bit drift (nondeterministic kernels) is
    tolerated with a warning and the first copy is used, anything larger is refused."""
    if torch.equal(a, b):
        return True
    if a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-6):
        log.warning("%s: replicated copies differ by up to %.2e; using the first", what,
                    (a.float() - b.float()).abs().max().item())
        return True
    return False


def _gather_tensor(name: str, where: dict[int, list[tuple[Path, Any]]], dim: Optional[int],
                   tp: int) -> torch.Tensor:
    """The full tensor ``name`` from its TP slices; replicated copies (on several PP stages, or on
    every TP rank) must agree."""
    parts = []
    for t in range(tp):
        copies = where.get(t, [])
        if not copies:
            raise CheckpointError(f"{name}: no slice for tp_rank {t} in any model shard")
        first = copies[0][1].get_tensor(name)
        for path, handle in copies[1:]:
            if not _same_copy(first, handle.get_tensor(name), f"{path}: {name}"):
                raise CheckpointError(f"{path}: tensor {name} differs from its copy in {copies[0][0].name}; "
                                      f"a tied or replicated weight must be identical on every stage")
        parts.append(first)
    if dim is None:
        for t in range(1, tp):
            if not _same_copy(parts[0], parts[t], f"{name} (tp_rank {t})"):
                raise CheckpointError(f"{name}: replicated tensor differs between tp_rank 0 and {t}; the "
                                      f"shards do not belong to one checkpoint")
        return parts[0]
    return torch.cat(parts, dim=dim)


def _index_shards(files: dict[tuple[int, int], Path], tp: int, pp: int) -> tuple[dict[str, dict[int, list]], list]:
    from safetensors import safe_open

    handles, by_name = [], {}
    for (t, p), path in sorted(files.items()):
        try:
            h = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); use another checkpoint") from None
        md = h.metadata() or {}
        if md.get("tp_rank") is not None and (md.get("tp_rank"), md.get("pp_rank"), md.get("tp"), md.get("pp")) != \
                (str(t), str(p), str(tp), str(pp)):
            raise CheckpointError(f"{path}: its header says tp_rank={md.get('tp_rank')} pp_rank={md.get('pp_rank')} "
                                  f"of tp={md.get('tp')} pp={md.get('pp')}, which does not match its name and "
                                  f"{META}; the directory mixes two checkpoints")
        handles.append(h)
        for name in h.keys():
            by_name.setdefault(name, {}).setdefault(t, []).append((path, h))
    return by_name, handles


def load_canonical_weights(ckpt_dir: PathLike, verify: str = "sizes") -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, full canonical tensors) of a complete checkpoint, at whatever TP/PP it was saved."""
    ckpt_dir, meta, files = _open_checked(ckpt_dir, verify)
    return meta, _merge_files(ckpt_dir, meta, files, names=None, target=None)


def load_weights_for_rank(ckpt_dir: PathLike, tp_rank: int, tp: int, names: Optional[Iterable[str]] = None,
                          verify: str = "off") -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, this TP rank's slices of ``names`` (default: all)) re-cut for ``tp``; one full tensor at a time
    is held, so a rank never needs the whole model in memory."""
    ckpt_dir, meta, files = _open_checked(ckpt_dir, verify)
    return meta, _merge_files(ckpt_dir, meta, files, names=names, target=(tp_rank, tp))


def _merge_files(ckpt_dir: Path, meta: dict, files: dict[tuple[int, int], Path], names: Optional[Iterable[str]],
                 target: Optional[tuple[int, int]]) -> dict[str, torch.Tensor]:
    cfg = model_config_of(meta, ckpt_dir)
    info = model_layout(cfg)
    dims, shapes = {n: d for n, (_, d) in info.items()}, {n: s for n, (s, _) in info.items()}
    tp, pp = int(meta["topology"].get("tp", 1)), int(meta["topology"].get("pp", 1))
    by_name, _handles = _index_shards(files, tp, pp)
    unknown = sorted(set(by_name) - set(dims))
    if unknown:
        raise CheckpointError(f"{ckpt_dir / MODEL_DIR}: tensor {unknown[0]} is not a parameter of the model in "
                              f"{META} (config and weights disagree)")
    wanted = list(dims) if names is None else list(names)
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise CheckpointError(f"{ckpt_dir / MODEL_DIR}: tensor(s) {', '.join(missing[:4])} missing from the model "
                              f"shards; the checkpoint is incomplete")
    out = {}
    for name in wanted:
        if name not in dims:
            raise KeyError(f"{name}: not a parameter of the model in {ckpt_dir / META}")
        full = _gather_tensor(name, by_name[name], dims[name], tp)
        if tuple(full.shape) != shapes[name]:
            raise CheckpointError(f"{ckpt_dir / MODEL_DIR}: tensor {name} has shape {tuple(full.shape)}, the model "
                                  f"in {META} needs {shapes[name]}")
        if target is not None and dims[name] is not None and target[1] > 1:
            if full.shape[dims[name]] % target[1]:
                raise CheckpointError(f"{name}: dimension {dims[name]} of {tuple(full.shape)} is not divisible by "
                                      f"tp={target[1]}; choose a tensor-parallel size that divides it")
            full = full.chunk(target[1], dim=dims[name])[target[0]].contiguous()
        out[name] = full
    return out


# --------------------------------------------------------------------------- writing whole checkpoints


def stage_of_names(names: Iterable[str], num_layers: int, pp: int) -> dict[str, int]:
    """A pipeline stage per canonical name: blocks spread evenly, embedding first, final norm and head last.
    (Loading merges by name, so any assignment reads back; this one matches ``partition=uniform``.)"""
    out = {}
    for n in names:
        if n.startswith("blocks."):  # blocks.<global index>.
            out[n] = min(pp - 1, int(n.split(".")[1]) * pp // max(1, num_layers))
        else:
            out[n] = 0 if n.startswith("embed.") else pp - 1
    return out


def split_for_topology(full_sd: dict[str, torch.Tensor], cfg: Any, tp: int,
                       stage_of: dict[str, int]) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """{(tp_rank, pp_rank): shard}: each tensor cut into ``tp`` chunks along its partition dim, placed on its stage."""
    info = model_layout(cfg)
    out: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for name, t in full_sd.items():
        if name not in info:
            raise CheckpointError(f"{name}: not a parameter of the model this config describes")
        shape, dim = info[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{name}: shape {tuple(t.shape)}, the config needs {shape}")
        if dim is not None and shape[dim] % tp:
            raise CheckpointError(f"{name}: dimension {dim} ({shape[dim]}) is not divisible by tp={tp}")
        chunks = t.chunk(tp, dim=dim) if dim is not None else [t] * tp
        for r in range(tp):
            out.setdefault((r, stage_of[name]), {})[name] = chunks[r]
    missing = sorted(set(info) - set(full_sd))
    if missing:
        raise CheckpointError(f"weights are missing tensor(s) {', '.join(missing[:4])}")
    return out


_PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _dtype_name(sd: dict[str, torch.Tensor]) -> str:
    """The stored weights' dtype in train.precision's words (fp32 | bf16 | fp16)."""
    names = {_PRECISION_NAMES.get(t.dtype, str(t.dtype).replace("torch.", "")) for t in sd.values()
             if t.is_floating_point()}
    return names.pop() if len(names) == 1 else ",".join(sorted(names))


def build_weights_only_meta(config: dict, full_sd: dict[str, torch.Tensor], tp: int, pp: int,
                            extra_meta: Optional[dict] = None) -> dict:
    """meta.json content of a weights-only checkpoint (step 0 unless ``extra_meta`` says otherwise)."""
    from megatrain.config import Config

    cfg = Config.from_dict(config)
    meta = {"format": FORMAT, "version": VERSION, "step": 0, "consumed_samples": 0, "weights_only": True,
            "config": cfg.to_dict(), "config_hash": cfg.hash(), "model_hash": cfg.model_hash(),
            "data_fingerprint": None, "tokenizer_sha256": None, "tokenizer_path": None,
            "topology": {"tp": tp, "pp": pp, "dp": 1, "zero_stage": cfg.deepspeed.zero_stage, "world_size": tp * pp},
            "dtype": _dtype_name(full_sd)}
    meta.update(extra_meta or {})
    return meta


def write_weights_only_checkpoint(out_dir: PathLike, config: dict, full_sd: dict[str, torch.Tensor], *, tp: int = 1,
                                  pp: int = 1, extra_meta: Optional[dict] = None,
                                  extra_files: Optional[dict[str, PathLike]] = None, overwrite: bool = False,
                                  progress: Any = None) -> Path:
    """Write a complete weights-only checkpoint of canonical tensors cut for (tp, pp), atomically.

    ``config`` is a Config dict; its parallel.tensor / parallel.pipeline are set to tp / pp so that
    meta.json describes the shards. ``extra_files`` ({relpath: source}) are copied in (e.g. the
    tokenizer). The directory is built under a temporary name and renamed when complete."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir}: already exists; choose another output or allow replacing it (--overwrite)")
    config = json.loads(json.dumps(config))
    config.setdefault("parallel", {}).update({"tensor": tp, "pipeline": pp})
    meta = build_weights_only_meta(config, full_sd, tp, pp, extra_meta)
    cfg = model_config_of(meta, out_dir)
    stage_of = stage_of_names(full_sd, cfg.num_layers, pp)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for (t, p), shard in split_for_topology(full_sd, cfg, tp, stage_of).items():
            write_model_shard(tmp, t, p, shard, tp, pp)
            if progress is not None:
                progress(len(shard))
        for rel, src in (extra_files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
        write_meta(tmp, meta)
        write_manifest(tmp)
        mark_complete(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
