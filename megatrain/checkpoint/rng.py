"""Random-number state: saved per rank, restored at the same layout, re-derived at another."""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch

from megatrain.checkpoint.layout import CheckpointError


def rng_state(tracker: Optional[Any]) -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generators, plus the TP-region tracker's states."""
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
    if tracker is not None and tracker.state is not None:
        state["tp_tracker"] = tracker.state
    return state


def restore_rng(tracker: Optional[Any], state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    if tracker is not None and state.get("tp_tracker") is not None:
        tracker.state = state["tp_tracker"]


def reseed_rng(tracker: Optional[Any], seed: int, tp_rank: int) -> None:
    """After a topology change the saved per-rank streams do not map onto the new ranks: start new ones,
    still a function of the seed (the caller adds the step), identical over TP ranks where they must be."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if tracker is not None:
        tracker.seed(seed, tp_rank)


def load_rng_file(path) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError and friends: the file is not plain data
        raise CheckpointError(f"{path}: not a plain-data RNG state ({str(e).splitlines()[0]}); refusing to load "
                              f"it, use another checkpoint") from None
