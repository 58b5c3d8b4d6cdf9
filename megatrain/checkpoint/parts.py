"""What a checkpoint is made of: the parts of a run it saves and restores, and the run's progress."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatrain.config import Config


@dataclass
class Progress:
    """Where a run is: optimizer steps taken and samples consumed (the data loader resumes from it)."""

    step: int = 0
    consumed_samples: int = 0


@dataclass
class RunParts:
    """``cfg`` (recorded in every checkpoint and checked against it at resume), ``st`` the ParallelState
    (who writes which shard), ``engine`` (DeepSpeed: model, optimizer, schedule), ``rng_tracker`` (the
    TP-region RNG tracker, or None), ``guard`` (the step guard's counters, or None) and ``fingerprints``
    ({"data", "tokenizer"}: what the run reads)."""

    cfg: Config
    st: Any
    engine: Any
    run_dir: Path
    rng_tracker: Any = None
    guard: Any = None
    fingerprints: dict = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return Path(self.run_dir) / "checkpoints"


def make_parts(cfg: Config, st: Any, engine: Any, run_dir: Path, rng_tracker: Any = None, guard: Any = None,
               fingerprints: Optional[dict] = None) -> RunParts:
    return RunParts(cfg, st, engine, Path(run_dir), rng_tracker, guard, dict(fingerprints or {}))
