"""Writing one checkpoint, atomically, from every rank.

Every rank writes its part into ``.tmp-step_N``: DeepSpeed's own files (``ds/``), its canonical
model shard and portable optimizer state (DP rank 0 of each TP/PP shard), its RNG state. After a
barrier the files are hashed (spread over the ranks) and fsynced; rank 0 then writes ``meta.json``,
the manifest and ``COMPLETE``, renames the directory to ``step_N``, fsyncs the parent, moves
``latest`` and prunes. A crash at any point leaves the previous checkpoints untouched and no
loadable partial one.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatrain.checkpoint import layout, optim_state
from megatrain.checkpoint.compat import schedule_fingerprint, topology_of
from megatrain.checkpoint.parts import Progress, RunParts
from megatrain.checkpoint.rng import rng_state
from megatrain.engine import internals
from megatrain.files import atomic_path, atomic_write_json, file_entry, fsync_dir, replace_dir
from megatrain.model.names import canonical_named_parameters

log = logging.getLogger(__name__)

CRASH_ENV = "MEGATRAIN_TEST_CRASH_AT"  # tests: "PHASE" or "PHASE@STEP" kills the process (SIGKILL) inside save()
SAVE_PHASES = ("start", "ds", "model", "optim", "rng", "hashed", "meta", "manifest", "complete", "renamed",
               "latest", "pruned")


def _crash_point(phase: str, step: int) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    name, _, at = spec.partition("@")
    if name == phase and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def local_model_tensors(ck: RunParts) -> dict[str, torch.Tensor]:
    """This rank's canonical-named parameter shards on CPU (gathered across DP first under ZeRO-3)."""
    params = canonical_named_parameters(ck.engine.module, ck.cfg.model)
    if ck.cfg.deepspeed.zero_stage == 3:
        import deepspeed

        out = {}
        for name, p in params.items():  # one at a time: gathering everything at once needs the whole model
            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.detach().cpu().clone()
        return out
    return {n: p.detach().cpu().clone() for n, p in params.items()}


def build_meta(ck: RunParts, progress: Progress, optimizer_step: int, portable: bool) -> dict[str, Any]:
    import megatrain

    cfg = ck.cfg
    return {
        "format": layout.FORMAT, "version": layout.VERSION, "step": progress.step,
        "consumed_samples": progress.consumed_samples, "weights_only": False, "config": cfg.to_dict(),
        "config_hash": cfg.hash(), "model_hash": cfg.model_hash(),
        "data_fingerprint": ck.fingerprints.get("data"), "tokenizer_sha256": ck.fingerprints.get("tokenizer"),
        "tokenizer_path": cfg.data.tokenizer, "stream": {"seq_len": cfg.train.seq_len, "seed": cfg.train.seed},
        "schedule": schedule_fingerprint(cfg), "topology": topology_of(cfg, ck.st), "dtype": cfg.train.precision,
        "optimizer_step": optimizer_step, "portable_optimizer": portable,
        "resilience": ck.guard.state_dict() if ck.guard is not None else None,
        "megatrain_version": megatrain.__version__,
    }


def save(ck: RunParts, progress: Progress) -> Path:
    """Every rank calls this at the same step. Returns the final checkpoint directory."""
    root, step, st = ck.root, progress.step, ck.st
    tag = layout.tag_for_step(step)
    final, tmp = root / tag, root / f".tmp-{tag}"
    if st.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    _crash_point("start", step)
    ck.engine.save_checkpoint(str(tmp / "ds"), tag="state", save_latest=False)
    _crash_point("ds", step)
    tensors = local_model_tensors(ck)
    if st.dp_rank == 0 and st.cp_rank == 0:  # one writer per TP/PP shard (context ranks hold the same weights)
        layout.write_model_shard(tmp, st.tp_rank, st.pp_rank, tensors, st.tp_size, st.pp_size)
    _crash_point("model", step)
    optimizer_step, portable = save_portable_optimizer(ck, tmp)
    _crash_point("optim", step)
    with atomic_path(tmp / "rng" / f"rank{st.rank:05d}.pt", fsync=False) as f:
        torch.save(rng_state(ck.rng_tracker), f)
    _crash_point("rng", step)
    _barrier()
    entries = _hash_distributed(tmp, st.rank, st.world_size)
    _crash_point("hashed", step)
    if st.rank == 0:
        _finish(ck, progress, tmp, final, entries, optimizer_step, portable)
    _barrier()
    return final


def save_portable_optimizer(ck: RunParts, tmp: Path) -> tuple[int, bool]:
    """Write ``optim/tpXX_ppYY.safetensors`` (DP rank 0) when ``checkpoint.portable_optimizer``.
    Returns (AdamW step count, whether the run keeps portable state)."""
    opt, portable = ck.engine.optimizer, ck.cfg.checkpoint.portable_optimizer
    step = internals.optimizer_step_count(opt)
    if not portable or step == 0:
        return step, portable
    params = canonical_named_parameters(ck.engine.module, ck.cfg.model)
    tensors = optim_state.gather_state(params, opt, with_fp32=ck.cfg.train.precision != "fp32")
    st = ck.st
    if st.dp_rank == 0 and st.cp_rank == 0:
        optim_state.write_state(optim_state.optim_path(tmp, st.tp_rank, st.pp_rank), tensors,
                                {"step": str(step), "tp": str(st.tp_size), "pp": str(st.pp_size)})
    return step, True


def _finish(ck: RunParts, progress: Progress, tmp: Path, final: Path, entries: dict, optimizer_step: int,
            portable: bool) -> None:
    """Rank 0, once every rank's files are on disk: meta, manifest, COMPLETE, rename, latest, prune."""
    step = progress.step
    layout.write_meta(tmp, build_meta(ck, progress, optimizer_step, portable))
    entries[layout.META] = file_entry(tmp / layout.META, fsync=True)
    _crash_point("meta", step)
    atomic_write_json(tmp / layout.MANIFEST, {"files": dict(sorted(entries.items()))})
    _crash_point("manifest", step)
    for d in sorted({p.parent for p in tmp.rglob("*")}, reverse=True):  # directory entries too, deepest first
        fsync_dir(d)
    layout.mark_complete(tmp)
    _crash_point("complete", step)
    replace_dir(tmp, final)
    _crash_point("renamed", step)
    layout.update_latest(ck.root, final.name)
    _crash_point("latest", step)
    removed = prune(ck.root, ck.cfg.checkpoint.keep_last, ck.cfg.checkpoint.keep_every)
    _crash_point("pruned", step)
    log.info("saved checkpoint %s (step %d%s)", final, step,
             f"; removed {', '.join(p.name for p in removed)}" if removed else "")


def _remove_leftovers(root: Path) -> None:
    """Temporary directories of saves that were killed: never complete, never loaded, safe to delete."""
    for p in root.iterdir():
        if p.is_dir() and (p.name.startswith(".tmp-step_") or ".old-" in p.name or ".tmp-" in p.name):
            log.warning("removing %s, left by an interrupted save", p)
            shutil.rmtree(p, ignore_errors=True)


def _hash_distributed(tmp: Path, rank: int, world: int) -> dict[str, dict]:
    """Manifest entries of every file under ``tmp`` (each fsynced on the way: the rename that publishes
    it must not overtake its data on a crash); rank r hashes every world-th file from the r-th, so a
    large checkpoint is read in parallel. Returns the merged table on rank 0 ({} elsewhere)."""
    rels = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    if world == 1:
        return {r: file_entry(tmp / r, fsync=True) for r in rels}
    # Every rank's listing: on a network file system a rank's directory cache may not show another
    # node's files yet (opening them by name does), and each writer surely sees its own.
    listings: list = [None] * world
    dist.all_gather_object(listings, rels)
    rels = sorted(set().union(*listings))
    mine = {r: file_entry(tmp / r, fsync=True) for r in rels[rank::world]}
    gathered: list = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return {k: v for part in gathered for k, v in part.items()} if rank == 0 else {}


def prune(root: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last`` (multiples of ``keep_every`` stay).
    Only rank 0 calls it. Incomplete ``step_*`` directories are left alone: they are never loaded, and
    deleting what someone may be writing is worse than keeping it."""
    if keep_last <= 0:
        return []
    done = layout.list_checkpoints(root)
    removed = []
    for p in done[:-keep_last]:
        if keep_every and layout.step_of_tag(p.name) % keep_every == 0:
            continue
        # Remove COMPLETE first: a crash halfway through leaves an incomplete directory, not a broken "complete" one.
        (p / layout.COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed
