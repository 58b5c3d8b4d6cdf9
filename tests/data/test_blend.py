"""Blends hold their weights within one sample at every prefix of the stream."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from megatrain.config import DataConfig
from megatrain.data.blend import MAX_PERIOD, build_blend_indices, parse_blend, period_weights
from megatrain.data.loader import build_datasets
from tests.data.helpers import make_dataset

WEIGHT_SETS = [
    ["1", "1"],
    ["0.3", "0.7"],
    ["1", "2", "3"],
    ["0.9", "0.05", "0.05"],
    ["0.00282514", "0.05078674", "0.01389963", "0.00095796", "0.00099203", "0.93053849"],  # Megatron's greedy drifts here
    ["5", "0", "2"],  # a zero weight: that dataset is never drawn
    ["0.01", "0.01", "0.01", "0.97"],
]


def _max_deviation(dataset_index: np.ndarray, weights: list) -> float:
    w = np.array([float(Fraction(x)) for x in weights])
    w /= w.sum()
    onehot = np.zeros((dataset_index.size, w.size))
    onehot[np.arange(dataset_index.size), dataset_index] = 1
    counts = onehot.cumsum(axis=0)
    targets = np.arange(1, dataset_index.size + 1)[:, None] * w
    return float(np.abs(counts - targets).max())


@pytest.mark.parametrize("weights", WEIGHT_SETS, ids=[" ".join(w) for w in WEIGHT_SETS])
def test_within_one_sample_at_every_prefix(weights):
    dataset_index, sample_index = build_blend_indices(weights, 6000)
    assert _max_deviation(dataset_index, weights) < 1.0
    for i in range(len(weights)):  # each dataset's samples are taken in order 0, 1, 2, ...
        picked = sample_index[dataset_index == i]
        assert picked.tolist() == list(range(picked.size))


def test_random_weights_within_one_sample():
    rng = np.random.default_rng(0)
    for _ in range(30):
        k = int(rng.integers(2, 8))
        weights = [f"{x:.4f}" for x in rng.random(k) ** 3 + 1e-3]
        dataset_index, _ = build_blend_indices(weights, 3000)
        assert _max_deviation(dataset_index, weights) < 1.0, weights


def test_periodic_stream_is_tiled_exactly():
    weights = ["1", "2", "4"]  # period 7
    dataset_index, _ = build_blend_indices(weights, 70)
    assert np.array_equal(dataset_index[:7], dataset_index[63:])
    assert np.bincount(dataset_index[:7]).tolist() == [1, 2, 4]


def test_huge_period_is_rounded_and_stays_close():
    weights = ["1234567", "7654321", "1000003"]  # exact period ~9.9M samples
    a = period_weights(weights)
    assert sum(a) <= MAX_PERIOD
    dataset_index, _ = build_blend_indices(weights, 20000)
    assert _max_deviation(dataset_index, weights) < 1.0 + 20000 * 3 / MAX_PERIOD


def test_parse_blend():
    assert parse_blend("data/a") == [("1", "data/a")]
    assert parse_blend("0.3 a  0.7 b") == [("0.3", "a"), ("0.7", "b")]


def test_blend_through_build_datasets(tmp_path):
    # dataset A holds tokens < 500, B tokens >= 500: each sample shows which dataset it came from
    rng = np.random.default_rng(0)
    a = make_dataset(str(tmp_path / "a"), [rng.integers(0, 500, 50).tolist() for _ in range(40)])
    b = make_dataset(str(tmp_path / "b"), [rng.integers(500, 1000, 50).tolist() for _ in range(40)])
    cfg = DataConfig(path=f"0.25 {a} 0.75 {b}", split="90,10,0", cache_dir=str(tmp_path / "cache"))
    out = build_datasets(cfg, seq_len=16, num_samples={"train": 400, "valid": 20}, seed=5, vocab_size=1000,
                         tokenizer_sha256=None)
    assert set(out) == {"train", "valid"}
    train = out["train"]
    assert len(train) == 400
    source = np.array([int(train[i].max() >= 500) for i in range(400)])
    assert (np.array([int(train[i].min() >= 500) for i in range(400)]) == source).all()  # never mixed
    assert _max_deviation(source, ["0.25", "0.75"]) < 1.0
    again = build_datasets(cfg, seq_len=16, num_samples={"train": 400, "valid": 20}, seed=5, vocab_size=1000,
                           tokenizer_sha256=None)["train"]
    assert all(np.array_equal(train[i], again[i]) for i in range(0, 400, 37))
