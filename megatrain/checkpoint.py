"""Save and resume: DeepSpeed's engine state plus megatrain's own, written atomically.

A checkpoint directory (layout in ``ckpt_layout``) holds DeepSpeed's shards under
``ds/`` (optimizer and engine state, for exact resume), megatrain's model
shards as safetensors under canonical names (for conversion, resharding and
weights-only resume), per-rank RNG states, ``meta.json`` and a manifest. It is
written under a temporary name, completed, then renamed; ``latest`` moves last.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatrain import ckpt_layout as layout
from megatrain.config import ConfigError

if TYPE_CHECKING:
    from megatrain.trainer import Trainer

log = logging.getLogger(__name__)


def checkpoint_root(tr: "Trainer") -> Path:
    return tr.run_dir / "checkpoints"


# --------------------------------------------------------------------------- what goes in


def local_model_tensors(tr: "Trainer") -> dict[str, torch.Tensor]:
    """This rank's canonical-named parameter shards on CPU (gathered across DP first under ZeRO-3)."""
    from megatrain.engine import canonical_named_parameters

    params = canonical_named_parameters(tr.engine.module, tr.cfg.model)
    if tr.cfg.deepspeed.zero_stage == 3:
        import deepspeed

        out = {}
        for name, p in params.items():  # one at a time: gathering everything at once needs the whole model
            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.detach().cpu().clone()
        return out
    return {n: p.detach().cpu().clone() for n, p in params.items()}


def rng_state(tr: "Trainer") -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if tr.built.ctx.rng is not None and tr.built.ctx.rng.state is not None:
        state["tp_tracker"] = tr.built.ctx.rng.state
    return state


def restore_rng(tr: "Trainer", state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    if tr.built.ctx.rng is not None and state.get("tp_tracker") is not None:
        tr.built.ctx.rng.state = state["tp_tracker"]


def build_meta(tr: "Trainer") -> dict[str, Any]:
    import megatrain

    st, cfg = tr.st, tr.cfg
    return {
        "format": "megatrain-checkpoint", "version": 1, "step": tr.step, "consumed_samples": tr.consumed_samples,
        "weights_only": False, "config": cfg.to_dict(), "config_hash": cfg.hash(), "model_hash": cfg.model_hash(),
        "data_fingerprint": tr.fingerprints.get("data"), "tokenizer_sha256": tr.fingerprints.get("tokenizer"),
        "tokenizer_path": cfg.data.tokenizer,
        "topology": {"tp": st.tp_size, "pp": st.pp_size, "dp": st.dp_size, "zero_stage": cfg.deepspeed.zero_stage,
                     "world_size": st.world_size},
        "dtype": cfg.train.precision, "megatrain_version": megatrain.__version__,
    }


# --------------------------------------------------------------------------- save


def save(tr: "Trainer") -> Path:
    """Every rank calls this at the same step. Returns the final checkpoint directory."""
    root = checkpoint_root(tr)
    tag = layout.tag_for_step(tr.step)
    final, tmp = root / tag, root / f".tmp-{tag}"
    if tr.st.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a save that was killed: never completed, never loaded
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    tr.engine.save_checkpoint(str(tmp / "ds"), tag="state", save_latest=False)
    tensors = local_model_tensors(tr)
    if tr.st.dp_rank == 0:
        layout.write_model_shard(tmp, tr.st.tp_rank, tr.st.pp_rank, tensors, tr.st.tp_size, tr.st.pp_size)
    _write_rng(tmp / "rng" / f"rank{tr.st.rank:05d}.pt", rng_state(tr))
    dist.barrier()
    if tr.st.rank == 0:
        layout.write_meta(tmp, build_meta(tr))
        layout.write_manifest(tmp)
        layout.mark_complete(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        layout.update_latest(root, tag)
        prune(root, tr.cfg.checkpoint.keep_last, tr.cfg.checkpoint.keep_every)
        log.info("saved checkpoint %s (step %d)", final, tr.step)
    dist.barrier()
    return final


def _write_rng(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last`` (multiples of ``keep_every`` stay)."""
    if keep_last <= 0:
        return []
    done = sorted((p for p in root.glob("step_*") if layout.is_complete(p)), key=_step_of)
    removed = []
    for p in done[:-keep_last]:
        if keep_every and _step_of(p) % keep_every == 0:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _step_of(p: Path) -> int:
    return int(p.name.split("_")[-1])


# --------------------------------------------------------------------------- resume


def resolve_resume_path(tr: "Trainer") -> Optional[Path]:
    mode = tr.cfg.train.resume
    if mode == "never":
        return None
    if mode == "auto":
        found = layout.find_resume_checkpoint(checkpoint_root(tr))
        if found is None:
            log.info("train.resume=auto: no complete checkpoint under %s; starting from scratch", checkpoint_root(tr))
        return found
    path = Path(mode)
    if path.is_dir() and (path / "latest").is_file():
        found = layout.find_resume_checkpoint(path)
        if found is None:
            raise layout.CheckpointError(f"train.resume={mode}: no complete checkpoint in this directory")
        return found
    if not layout.is_complete(path):
        raise layout.CheckpointError(f"train.resume={mode}: not a complete megatrain checkpoint (missing, or no "
                                     f"COMPLETE marker: the save was interrupted); pick another or use resume=auto")
    return path


def check_compatible(tr: "Trainer", meta: dict, path: Path) -> None:
    """Refuse to continue from a checkpoint of another model, tokenizer or dataset, unless allowed."""
    allow = set(tr.cfg.train.resume_allow_changes)
    checks = [("model", meta.get("model_hash"), tr.cfg.model_hash(), "model shape"),
              ("tokenizer", meta.get("tokenizer_sha256"), tr.fingerprints.get("tokenizer"), "tokenizer"),
              ("data", meta.get("data_fingerprint"), tr.fingerprints.get("data"), "dataset / blend")]
    for key, old, new, what in checks:
        if old is not None and new is not None and old != new and key not in allow:
            raise ConfigError(f"checkpoint {path}: the {what} differs from this run's ({old} != {new}); "
                              f"resume with the original {what}, or allow it deliberately with "
                              f"train.resume_allow_changes=[{key}]")


def resume(tr: "Trainer") -> tuple[int, int]:
    """Load the checkpoint that ``train.resume`` names into the engine; returns (step, consumed samples)."""
    path = resolve_resume_path(tr)
    if path is None:
        return 0, 0
    meta = layout.read_meta(path)
    if tr.st.rank == 0:
        layout.verify_manifest(path, tr.cfg.checkpoint.verify)  # before DeepSpeed unpickles anything in it
    dist.barrier()
    check_compatible(tr, meta, path)
    topo, st = meta["topology"], tr.st
    same = (topo["tp"], topo["pp"], topo["dp"]) == (st.tp_size, st.pp_size, st.dp_size)
    if meta.get("weights_only") or not same:
        load_weights_only(tr, path, meta, same)
    else:
        tr.engine.load_checkpoint(str(path / "ds"), tag="state", load_module_strict=True,
                                  load_optimizer_states=True, load_lr_scheduler_states=True)
        rng_file = path / "rng" / f"rank{st.rank:05d}.pt"
        if rng_file.is_file():
            restore_rng(tr, torch.load(rng_file, weights_only=True))
    log.info("resumed from %s: step %d, %d samples consumed", path, meta["step"], meta["consumed_samples"])
    return int(meta["step"]), int(meta["consumed_samples"])


def load_weights_only(tr: "Trainer", path: Path, meta: dict, same_topology: bool) -> None:
    """Model weights from the canonical shards (any TP/PP), optimizer and schedule state fresh."""
    from megatrain.engine import canonical_named_parameters
    from megatrain.parallel.layers import shard_of

    if not meta.get("weights_only"):
        log.warning("checkpoint %s was saved with TP=%s PP=%s DP=%s; this run has TP=%d PP=%d DP=%d: loading its "
                    "weights only (optimizer state restarts)", path, meta["topology"]["tp"], meta["topology"]["pp"],
                    meta["topology"]["dp"], tr.st.tp_size, tr.st.pp_size, tr.st.dp_size)
    _, full = layout.load_canonical_weights(path, verify="off")
    params = canonical_named_parameters(tr.engine.module, tr.cfg.model)
    for name, p in params.items():
        if name not in full:
            raise layout.CheckpointError(f"checkpoint {path}: tensor {name} is missing")
        src = shard_of(full[name], getattr(p, "partition_dim", None), tr.st.tp_rank, tr.st.tp_size)
        _assign(tr, p, src)
    # DeepSpeed keeps its own fp32 master copy of the weights; refresh it from the module.
    opt = tr.engine.optimizer
    if hasattr(opt, "refresh_fp32_params"):
        opt.refresh_fp32_params()
    elif hasattr(opt, "_restore_from_bit16_weights"):
        opt._restore_from_bit16_weights()


def _assign(tr: "Trainer", p: torch.nn.Parameter, src: torch.Tensor) -> None:
    if tuple(src.shape) != tuple(getattr(p, "ds_shape", p.shape)):
        raise layout.CheckpointError(f"checkpoint tensor shape {tuple(src.shape)} does not fit parameter of shape "
                                     f"{tuple(p.shape)}")
    if tr.cfg.deepspeed.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):  # rank 0 of the param's DP group
            p.data.copy_(src.to(p.dtype))
        return
    with torch.no_grad():
        p.copy_(src.to(p.device, p.dtype))
