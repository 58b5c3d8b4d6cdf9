"""The Checkpointer: handed the parts of a run it saves and restores, nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from megatrain.checkpoint import resume as resume_mod
from megatrain.checkpoint import save as save_mod
from megatrain.checkpoint.parts import Progress, make_parts
from megatrain.config import Config


class Checkpointer:
    """Saves and restores one run's state under ``run_dir/checkpoints`` (see :class:`RunParts` for the
    parts). Training calls :meth:`resume` once at start and :meth:`save` at its cadence."""

    def __init__(self, cfg: Config, st: Any, engine: Any, run_dir: Path, *, rng_tracker: Any = None,
                 guard: Any = None, fingerprints: Optional[dict] = None):
        self.parts = make_parts(cfg, st, engine, run_dir, rng_tracker, guard, fingerprints)

    @property
    def root(self) -> Path:
        return self.parts.root

    def save(self, progress: Progress) -> Path:
        """Write a checkpoint of ``progress`` (every rank, same step); returns its directory."""
        return save_mod.save(self.parts, progress)

    def resume(self) -> Progress:
        """Load what ``train.resume`` names (every rank); Progress(0, 0) when starting fresh."""
        return resume_mod.resume(self.parts)
