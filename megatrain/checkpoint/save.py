"""Writing one checkpoint, atomically, from every rank; in the background where it is safe.

Every rank: a barrier (rank 0 has made ``.tmp-step_N``), then a snapshot of its state in host memory
(``snapshot.py``: the only part that stops training), then its files: ``model/`` and ``optim/`` (DP
rank 0 of each TP/PP shard), its ``rng/`` file, each hashed as it is written and fsynced, and a
``done/rankNNNNN.json`` record of their manifest entries (``writer.py``). Rank 0 waits for every
record, writes ``meta.json``, the manifest and ``COMPLETE``, renames the directory to ``step_N``,
fsyncs the parent, moves ``latest`` and prunes. With ``checkpoint.async_save`` the writing runs in a
background thread and uses no collective; without it the same steps run inline, with barriers. A
crash at any point leaves the previous checkpoints untouched and no loadable partial one.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatrain.checkpoint import layout
from megatrain.checkpoint.parts import Progress, RunParts
from megatrain.checkpoint.snapshot import HostPool, Snapshot, take_snapshot
from megatrain.checkpoint.writer import DONE_DIR, BackgroundWriter, SaveError, collect_done, write_done, \
    write_rank_files
from megatrain.files import atomic_write_json, file_entry, fsync_dir, replace_dir

log = logging.getLogger(__name__)

CRASH_ENV = "MEGATRAIN_TEST_CRASH_AT"  # tests: "PHASE" or "PHASE@STEP" kills the process (SIGKILL) inside save()
SAVE_PHASES = ("start", "snapshot", "model", "optim", "rng", "hashed", "done", "meta", "manifest", "complete",
               "renamed", "latest", "pruned")


def _crash_point(phase: str, step: int) -> None:
    """Tests: ``PHASE[@STEP]`` SIGKILLs this process there; ``enospc:PHASE[@STEP]`` raises the OSError a full
    disk gives (on every rank that has the variable)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    fault, _, spec = spec.rpartition(":")
    name, _, at = spec.partition("@")
    if name == phase and (not at or int(at) == step):
        if fault == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(injected at save phase {phase})")
        os.kill(os.getpid(), signal.SIGKILL)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _agree(error: Optional[str], ck: RunParts, tmp: Path, step: int) -> None:
    """Every rank learns whether any rank failed to write; then all raise the same SaveError, after rank 0
    removed the temporary directory. Replaces a barrier (so a rank whose write failed does not leave the
    others waiting)."""
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if not failed:
        return
    if ck.st.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    newest = layout.list_checkpoints(ck.root)
    rank, first = failed[0]
    raise SaveError(f"checkpoint save at step {step} failed on {len(failed)} rank(s) (rank {rank}: {first}); its "
                    f"temporary directory {tmp.name} was removed and nothing was installed, so the newest complete "
                    f"checkpoint is still {newest[-1].name if newest else 'none'}. Free space (or fix the file "
                    f"system) and resume")


def _describe(e: OSError) -> str:
    return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")


def set_aside_newer(ck: RunParts) -> list[Path]:
    """Rank 0, at a run's first save: step directories newer than the step it resumed from (0 when it started
    fresh) are renamed to ``step_N.superseded-<time>``, never deleted or overwritten: they may be a newer run's
    work that resume could not use (a stray file, a missing COMPLETE) or that train.resume=never skipped."""
    if ck.set_aside_done or ck.resumed_step is None:
        return []
    ck.set_aside_done = True
    stamp = time.strftime("%Y%m%dT%H%M%S")
    moved = []
    for p in layout.list_checkpoints(ck.root, complete_only=False):
        if layout.step_of_tag(p.name) > ck.resumed_step:
            aside = p.with_name(f"{p.name}.superseded-{stamp}")
            os.replace(p, aside)
            moved.append(aside)
            log.warning("%s is newer than the step this run resumed from (%d); set aside as %s instead of being "
                        "overwritten or pruned. Delete it once you are sure it is not needed", p, ck.resumed_step,
                        aside.name)
    if moved:
        fsync_dir(ck.root)
    return moved


@dataclass
class SaveResult:
    """One save as the training loop sees it: seconds it was blocked, seconds until this rank's part
    (rank 0: the whole checkpoint) was on disk, and what it removed or why it failed."""

    step: int
    path: Path
    blocked_s: float = 0.0
    wait_s: float = 0.0  # of blocked_s: waiting for the previous save's write
    total_s: Optional[float] = None
    snapshot_bytes: int = 0
    removed: list = field(default_factory=list)
    background: bool = False


def save(ck: RunParts, progress: Progress, background: Optional[BackgroundWriter] = None,
         pool: Optional[HostPool] = None, wait_s: float = 0.0) -> SaveResult:
    """Every rank calls this at the same step. With ``background`` the files are written by its thread
    and this returns after the snapshot; the result's ``total_s`` is filled in when the write ends."""
    began = time.perf_counter() - wait_s
    root, step, st = ck.root, progress.step, ck.st
    tag = layout.tag_for_step(step)
    final, tmp = root / tag, root / f".tmp-{tag}"
    error = None
    if st.rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(root)
            set_aside_newer(ck)
            (tmp / "rng").mkdir(parents=True)
        except OSError as e:
            error = _describe(e)
    _agree(error, ck, tmp, step)  # the barrier before anyone writes into tmp
    _crash_point("start", step)
    snap = take_snapshot(ck, progress, pool or HostPool(keep=False))
    _crash_point("snapshot", step)
    res = SaveResult(step, final, wait_s=wait_s, snapshot_bytes=snap.num_bytes, background=background is not None)
    if background is not None:
        background.submit(functools.partial(_write_in_background, ck, snap, tmp, res, began), f"save-{tag}")
        res.blocked_s = time.perf_counter() - began
        return res
    try:
        entries = write_rank_files(tmp, snap, lambda phase: _crash_point(phase, step))
        write_done(tmp, st.rank, entries)
        _crash_point("done", step)
    except OSError as e:  # a full disk, permissions: every rank hears of it at _agree and raises SaveError
        error = _describe(e)
    _agree(error, ck, tmp, step)
    if st.rank == 0:
        try:
            res.removed = _publish(ck, snap, tmp, final, 0.0)
        except OSError as e:
            error = _describe(e)
    _agree(error, ck, tmp, step)
    res.blocked_s = res.total_s = time.perf_counter() - began
    return res


def _write_in_background(ck: RunParts, snap: Snapshot, tmp: Path, res: SaveResult, began: float) -> SaveResult:
    """The writer thread's job on every rank: files, 'done' record; on rank 0 then the publication.
    No collectives: the main thread may be in one of its own."""
    rank, step = ck.st.rank, snap.step
    try:
        entries = write_rank_files(tmp, snap, lambda phase: _crash_point(phase, step))
    except BaseException as e:
        try:  # tell rank 0, so that it gives up on this checkpoint instead of waiting
            write_done(tmp, rank, error=f"{type(e).__name__}: {e}")
        except OSError:
            pass
        raise SaveError(f"checkpoint {res.path.name}: rank {rank} could not write its files ({type(e).__name__}: "
                        f"{e}); the previous complete checkpoint stays the newest") from e
    write_done(tmp, rank, entries)
    _crash_point("done", step)
    if rank == 0:
        res.removed = _publish(ck, snap, tmp, res.path, 6 * ck.cfg.distributed.timeout_s)
    res.total_s = time.perf_counter() - began
    return res


def _publish(ck: RunParts, snap: Snapshot, tmp: Path, final: Path, timeout_s: float) -> list[Path]:
    """Rank 0, once every rank's record is there: meta, manifest, COMPLETE, rename, latest, prune."""
    try:
        entries = collect_done(tmp, ck.st.world_size, timeout_s)
    except SaveError as e:
        raise SaveError(f"checkpoint {final.name} not published: {e}; the previous complete checkpoint stays the "
                        f"newest") from None
    shutil.rmtree(tmp / DONE_DIR)  # bookkeeping of this save, not part of the checkpoint
    return _finish(ck, snap.meta, tmp, final, entries, snap.step)


def _finish(ck: RunParts, meta: dict, tmp: Path, final: Path, entries: dict, step: int) -> list[Path]:
    """Rank 0, once every rank's files are on disk: meta, manifest, COMPLETE, rename, latest, prune."""
    layout.write_meta(tmp, meta)
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
    return removed


def _remove_leftovers(root: Path) -> None:
    """Temporary directories of saves that were killed: never complete, never loaded, safe to delete."""
    for p in root.iterdir():
        if p.is_dir() and (p.name.startswith(".tmp-step_") or ".old-" in p.name or ".tmp-" in p.name):
            log.warning("removing %s, left by an interrupted save", p)
            shutil.rmtree(p, ignore_errors=True)


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
