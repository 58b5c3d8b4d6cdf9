"""Blends of datasets: ``W1 P1 W2 P2 ...`` mixed so that every prefix of the stream holds the weights.

Sample n of the blend comes from the dataset furthest below its target share, in the precise sense of
earliest-deadline-first scheduling: with normalized weights w_i, the k-th sample of dataset i must appear
among the first ceil(k / w_i) samples (so that count_i(n) >= floor(w_i n)) and not before sample
floor((k - 1) / w_i) + 1 (so that count_i(n) <= ceil(w_i n)). EDF meets every such window (Tijdeman's
chairman-assignment theorem), so |count_i(n) - w_i n| < 1 at every n: the mix is exact within one sample.
Megatron's greedy rule (argmax of w_i n - count_i) can drift further than one sample for three or more
datasets with uneven weights.

With weights w_i = a_i / Q in lowest terms, the schedule is periodic with period Q (after Q samples every
count equals a_i exactly), so only one period is scheduled (a heap over at most Q slots; weights are
rounded to denominators of at most 2^20 first) and the rest is tiled with numpy.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
from fractions import Fraction
from typing import Optional

import numpy as np

logger = logging.getLogger(__name__)

MAX_PERIOD = 1 << 20


def parse_blend(path: str, field: str = "data.path") -> list[tuple[str, str]]:
    """'P' -> [('1', 'P')]; 'W1 P1 W2 P2' -> [(W1, P1), (W2, P2)] with weights validated (kept as strings)."""
    from megatrain.config import ConfigError

    parts = str(path).split()
    if not parts:
        raise ConfigError(f"{field}: is empty; give a dataset prefix or a blend 'W1 P1 W2 P2 ...'")
    if len(parts) == 1:
        return [("1", parts[0])]
    if len(parts) % 2:
        raise ConfigError(f"{field}={path!r}: a blend alternates weights and prefixes ('W1 P1 W2 P2 ...'); "
                          f"got an odd number of items")
    pairs = list(zip(parts[0::2], parts[1::2]))
    for w, p in pairs:
        try:
            value = Fraction(w)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"{field}: blend weight {w!r} (before {p}) is not a number") from None
        if value < 0:
            raise ConfigError(f"{field}: blend weight {w} of {p} is negative; weights must be >= 0")
    if sum(Fraction(w) for w, _ in pairs) <= 0:
        raise ConfigError(f"{field}={path!r}: blend weights sum to zero; give at least one positive weight")
    return pairs


def period_weights(weights: list) -> list[int]:
    """Integers a_i with a_i / sum(a) equal to the normalized weights (denominator capped at 2^20)."""
    fr = [Fraction(str(w)) if not isinstance(w, Fraction) else w for w in weights]
    total = sum(fr)
    if total <= 0 or any(f < 0 for f in fr):
        raise ValueError(f"blend weights {weights} must be >= 0 with a positive sum")
    norm = [f / total for f in fr]
    q = math.lcm(*[f.denominator for f in norm])
    if q <= MAX_PERIOD:
        return [int(f * q) for f in norm]
    # Largest-remainder rounding to MAX_PERIOD parts: each realized weight moves by less than 2^-20.
    raw = [f * MAX_PERIOD for f in norm]
    a = [math.floor(r) for r in raw]
    for i in sorted(range(len(a)), key=lambda i: raw[i] - a[i], reverse=True)[:MAX_PERIOD - sum(a)]:
        a[i] += 1
    logger.warning("blend weights %s rounded to multiples of 1/%d (their exact period is %d samples)",
                   weights, MAX_PERIOD, q)
    g = math.gcd(*a)
    return [x // g for x in a]


def _edf_period(a: list[int], length: int) -> np.ndarray:
    """The first ``length`` (<= sum(a)) choices of the EDF schedule for integer weights ``a``."""
    q = sum(a)
    rel, dead, ids = [], [], []
    for i, ai in enumerate(a):
        if ai == 0:
            continue
        k = np.arange(1, ai + 1, dtype=np.int64)
        rel.append((k - 1) * q // ai + 1)
        dead.append(-((-k * q) // ai))
        ids.append(np.full(ai, i, dtype=np.int64))
    release, deadline, dataset = (np.concatenate(x) for x in (rel, dead, ids))
    order = np.lexsort((dataset, deadline, release))
    release, deadline, dataset = release[order].tolist(), deadline[order].tolist(), dataset[order].tolist()
    out = np.empty(length, dtype=np.int64)
    heap: list[tuple[int, int]] = []
    p = 0
    for t in range(1, length + 1):  # one period only; the full stream is tiled below
        while p < q and release[p] <= t:
            heapq.heappush(heap, (deadline[p], dataset[p]))
            p += 1
        d, i = heapq.heappop(heap)
        if d < t:  # cannot happen (Tijdeman); guard against a silent wrong mix
            raise RuntimeError(f"blend schedule missed a deadline for weights {a}")
        out[t - 1] = i
    return out


def build_blend_indices(weights: list, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index) for ``num_samples`` samples of the blend."""
    a = period_weights(weights)
    q = sum(a)
    period = _edf_period(a, min(q, num_samples))
    reps = -(-num_samples // period.size)
    dataset_index = np.tile(period, reps)[:num_samples]
    dtype = np.int16 if len(a) < 2**15 else np.int32
    dataset_index = dataset_index.astype(dtype)
    # k-th occurrence of dataset i -> its k-th sample: a cumulative count per dataset, vectorized.
    order = np.argsort(dataset_index, kind="stable")
    counts = np.bincount(dataset_index, minlength=len(a))
    group_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sample_index = np.empty(num_samples, dtype=np.int64)
    sample_index[order] = np.arange(num_samples, dtype=np.int64) - np.repeat(group_start, counts)
    return dataset_index, sample_index


def blend_counts(weights: list, num_samples: int) -> list[int]:
    """How many samples each dataset contributes to the first ``num_samples`` of the blend."""
    dataset_index, _ = build_blend_indices(weights, num_samples)
    return np.bincount(dataset_index, minlength=len(weights)).tolist()


class BlendedDataset:
    """Samples drawn from several datasets by :func:`build_blend_indices`; ``len`` is ``num_samples``."""

    def __init__(self, datasets: list, weights: list, num_samples: int, cache: Optional[tuple] = None):
        from megatrain.data.gpt_dataset import cached_arrays

        self.datasets, self.weights, self.num_samples = datasets, list(weights), int(num_samples)
        build = lambda: dict(zip(("dataset_index", "dataset_sample_index"),  # noqa: E731
                                 build_blend_indices(self.weights, self.num_samples)))
        if cache is not None:
            cache_dir, stem, desc = cache
            arrays = cached_arrays(cache_dir, stem, desc, ("dataset_index", "dataset_sample_index"), build)
        else:
            arrays = build()
        self.dataset_index = np.asarray(arrays["dataset_index"])
        self.dataset_sample_index = np.asarray(arrays["dataset_sample_index"])
        counts = np.bincount(self.dataset_index, minlength=len(datasets))
        for ds, need in zip(datasets, counts):
            if len(ds) < need:
                raise ValueError(f"blend needs {need} samples of {ds}, it has {len(ds)}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.datasets[self.dataset_index[idx]][self.dataset_sample_index[idx]]

    def document_starts(self, idx: int) -> np.ndarray:
        """Where documents begin inside sample ``idx`` (see :meth:`GPTDataset.document_starts`)."""
        return self.datasets[self.dataset_index[idx]].document_starts(self.dataset_sample_index[idx])


def blend_description(identities: list[dict], weights: list, num_samples: int, extra: dict) -> tuple[str, dict]:
    desc = {"class": "BlendedDataset", "datasets": identities, "weights": [str(w) for w in weights],
            "num_samples": int(num_samples), **extra}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20], desc
