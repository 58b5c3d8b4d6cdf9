"""RNG streams for tensor parallelism.

Two streams exist on every rank:

- the default one, seeded identically on all ranks of a TP group: dropout on
  replicated activations (after a row-parallel all-reduce) must drop the same
  elements on every TP rank or the replicas diverge;
- the model-parallel one, seeded with ``seed + offset + tp_rank``: dropout on
  activations that are split across TP ranks (attention probabilities of this
  rank's heads) must differ per rank, or every rank would drop the same pattern
  in different heads and the result would depend on the TP size.

``tracker.fork()`` swaps the model-parallel state in for the duration of a block
and saves its advanced state on exit, on the device the model runs on.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_TP_SEED_OFFSET = 2718


class RNGTracker:
    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.state: torch.Tensor | None = None

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def seed(self, seed: int, tp_rank: int) -> None:
        """Create the model-parallel stream without disturbing the default one."""
        saved = self._get()
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed + _TP_SEED_OFFSET + tp_rank)
        else:
            torch.manual_seed(seed + _TP_SEED_OFFSET + tp_rank)
        self.state = self._get()
        self._set(saved)

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        if self.state is None:
            raise RuntimeError("RNGTracker.fork() before seed(): call model.seed_rng(seed) after building the model")
        saved = self._get()
        self._set(self.state)
        try:
            yield
        finally:
            self.state = self._get()
            self._set(saved)

    def state_dict(self) -> dict:
        return {"state": self.state}

    def load_state_dict(self, sd: dict) -> None:
        self.state = sd["state"]
