"""The Checkpointer: handed the parts of a run it saves and restores, nothing else."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

from megatrain.checkpoint import layout
from megatrain.checkpoint import resume as resume_mod
from megatrain.checkpoint import save as save_mod
from megatrain.checkpoint.parts import Progress, make_parts
from megatrain.checkpoint.snapshot import HostPool
from megatrain.checkpoint.writer import BackgroundWriter, SaveError
from megatrain.config import Config

log = logging.getLogger(__name__)


def async_reason(cfg: Config) -> Optional[str]:
    """Why saves run synchronously in this run, or None when they run in the background."""
    if not cfg.checkpoint.async_save:
        return "checkpoint.async_save=false"
    if cfg.deepspeed.offload != "none":
        # The optimizer state already lives in host memory; a snapshot would hold a second copy of it there.
        return f"deepspeed.offload={cfg.deepspeed.offload} (a snapshot would double the host memory it uses)"
    return None


class Checkpointer:
    """Saves and restores one run's state under ``run_dir/checkpoints`` (see :class:`RunParts` for the
    parts). Training calls :meth:`resume` once at start, :meth:`save` at its cadence, :meth:`poll` at
    step boundaries (reports saves that finished) and :meth:`close` before it exits (waits for the
    write in flight). ``on_saved(record)`` receives one dict per finished save: step, path,
    save_blocked_s, save_total_s, save_wait_s, or save_error."""

    def __init__(self, cfg: Config, st: Any, engine: Any, run_dir: Path, *, rng_tracker: Any = None,
                 guard: Any = None, fingerprints: Optional[dict] = None,
                 on_saved: Optional[Callable[[dict], None]] = None):
        self.parts = make_parts(cfg, st, engine, run_dir, rng_tracker, guard, fingerprints)
        self.on_saved = on_saved
        self.sync_reason = async_reason(cfg)
        self._writer = None if self.sync_reason else BackgroundWriter()
        self._pool = HostPool(keep=self._writer is not None)
        self._pending: dict[int, save_mod.SaveResult] = {}
        self.failures = 0
        if self.sync_reason and cfg.checkpoint.async_save:
            log.info("checkpoints are written synchronously: %s", self.sync_reason)
        if not cfg.checkpoint.portable_optimizer and st.rank == 0:
            log.warning("checkpoint.portable_optimizer=false is ignored: the AdamW state is always stored once, "
                        "under canonical names (optim/); it is what a resume at any topology loads")

    @property
    def root(self) -> Path:
        return self.parts.root

    def save(self, progress: Progress) -> save_mod.SaveResult:
        """Snapshot ``progress`` (every rank, same step) and write it, in the background when enabled.
        Waits for the previous save's write first."""
        t0 = time.perf_counter()
        self._report(self._writer.wait() if self._writer else [])
        res = save_mod.save(self.parts, progress, self._writer, self._pool, wait_s=time.perf_counter() - t0)
        if self._writer is None:
            self._report([(res, None)])
        else:
            self._pending[id(res)] = res
        return res

    def poll(self) -> None:
        """Report saves whose background write has ended (cheap; call at step boundaries)."""
        if self._writer is not None and not self._writer.busy:
            self._report(self._writer.take())

    def close(self) -> None:
        """Wait for the write in flight (end of training, a stop signal, Ctrl-C) and report it."""
        if self._writer is not None:
            if self._writer.busy:
                log.info("waiting for the checkpoint write in flight to finish")
            self._report(self._writer.wait())

    def finish(self) -> None:
        """The end of training: wait for the last write, and make a failed one an error of the run (SaveError,
        exit 1) rather than only a log line, so that a job script knows its final checkpoint is missing."""
        before = self.failures
        self.close()
        if self.failures > before:
            newest = layout.list_checkpoints(self.root)
            raise SaveError(f"the final checkpoint could not be written (the error is logged above); the newest "
                            f"complete checkpoint is {newest[-1].name if newest else 'none'}. Fix the cause and "
                            f"resume: the run continues from there")

    def _report(self, finished: list) -> None:
        for res, err in finished:
            if err is not None:
                self.failures += 1
                pending = list(self._pending.values())
                self._pending.clear()
                step = pending[0].step if pending else None
                log.error("checkpoint save failed: %s", err)
                self._emit({"step": step, "save_error": str(err)})
                continue
            self._pending.pop(id(res), None)
            self._log_saved(res)

    def _log_saved(self, res: save_mod.SaveResult) -> None:
        st = self.parts.st
        if st.rank != 0:
            return
        removed = f"; removed {', '.join(p.name for p in res.removed)}" if res.removed else ""
        waited = f", {res.wait_s:.2f} s of it waiting for the previous save" if res.wait_s >= 0.005 else ""
        log.info("saved checkpoint %s (step %d): blocked %.2f s%s, total %.2f s (%s)%s", res.path, res.step,
                 res.blocked_s, waited, res.total_s or 0.0, "background" if res.background else "synchronous",
                 removed)
        self._emit({"step": res.step, "checkpoint": str(res.path), "save_blocked_s": res.blocked_s,
                    "save_wait_s": res.wait_s, "save_total_s": res.total_s, "save_async": res.background})

    def _emit(self, record: dict) -> None:
        if self.on_saved is not None:
            self.on_saved(record)

    def resume(self) -> Progress:
        """Load what ``train.resume`` names (every rank); Progress(0, 0) when starting fresh."""
        return resume_mod.resume(self.parts)
