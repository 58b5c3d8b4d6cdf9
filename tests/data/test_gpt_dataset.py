"""GPT sampling: windows across documents, coverage of an epoch, epochs, determinism, cached indices."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest

from megatrain.data import gpt_dataset
from megatrain.data.gpt_dataset import GPTDataset, build_sample_index, num_epochs_for, split_ranges
from megatrain.data.indexed import IndexedDataset
from tests.data.helpers import logging_calls, position_dataset

SEQ = 7


def _lengths(seed: int, n: int = 60) -> list[int]:
    rng = np.random.default_rng(seed)
    # long documents, short ones (the gather path), single tokens and empty ones
    return [int(x) for x in rng.choice([0, 1, 2, 3, 5, 9, 17, 40], size=n)]


def _stream(ds: GPTDataset) -> np.ndarray:
    """The split's token stream in document-index order: what samples are windows of."""
    return np.concatenate([ds.indexed.get(int(s)) for s in ds.document_index]).astype(np.int64)


def _dataset(tmp_path, lengths, num_samples=None, seed=3, seq_len=SEQ, name="train"):
    ix = IndexedDataset(position_dataset(str(tmp_path / "pos"), lengths))
    return GPTDataset(ix, (0, ix.num_documents), seq_len=seq_len, num_samples=num_samples, seed=seed,
                      cache_dir=str(tmp_path / "cache"), name=name)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_epoch_covers_every_token_once(tmp_path, seed):
    lengths = _lengths(seed)
    ds = _dataset(tmp_path, lengths)
    total = sum(lengths)
    n = len(ds)
    assert n == (total - 1) // SEQ
    seen = np.zeros(total, dtype=np.int64)
    last_label_of_final = None
    for k in range(n):
        s = ds[k]
        assert s.dtype == np.int64 and s.shape == (SEQ + 1,)
        seen[s[:-1]] += 1
        if int(ds.shuffle_index[k]) == n - 1:
            last_label_of_final = s[-1]
    seen[last_label_of_final] += 1
    # every token is in exactly one sample's inputs or is the final sample's last label,
    # except a tail shorter than one sample that the epoch cannot fill
    assert set(np.unique(seen).tolist()) <= {0, 1}
    assert total - seen.sum() == (total - 1) % SEQ
    stream = _stream(ds)
    uncovered = np.flatnonzero(seen == 0)
    assert sorted(uncovered.tolist()) == sorted(stream[len(stream) - uncovered.size:].tolist())


def test_exact_fit_covers_everything(tmp_path):
    ds = _dataset(tmp_path, [5, 0, 3, 8, 6])  # 22 tokens: (22 - 1) // 7 = 3 samples cover all 22
    assert len(ds) == 3
    tokens = np.concatenate([ds[k][:-1] for k in range(3)] + [_stream(ds)[-1:]])
    assert sorted(tokens.tolist()) == list(range(22))


def test_samples_are_windows_of_the_shuffled_stream(tmp_path):
    ds = _dataset(tmp_path, _lengths(5), num_samples=200)
    stream = _stream(ds)
    for k in range(len(ds)):
        j = int(ds.shuffle_index[k])
        assert ds[k].tolist() == stream[j * SEQ: j * SEQ + SEQ + 1].tolist()
    assert sorted(ds.shuffle_index.tolist()) == list(range(len(ds)))


def test_epochs(tmp_path):
    lengths = _lengths(7)
    per_epoch = (sum(lengths) - 1) // SEQ
    ds = _dataset(tmp_path, lengths, num_samples=3 * per_epoch + 5)
    assert ds.num_epochs == 4 and len(ds) >= 3 * per_epoch + 5
    counts = np.bincount(ds.document_index, minlength=len(lengths))
    nonempty = np.flatnonzero(np.array(lengths) > 0)
    assert (counts[nonempty] == 4).all() and counts.sum() == 4 * nonempty.size  # empty ones never appear
    # the small final epoch is shuffled apart: its sequences form the tail of the document index
    assert sorted(ds.document_index[-nonempty.size:].tolist()) == nonempty.tolist()
    assert num_epochs_for(100, 10, 9) == 1 and num_epochs_for(100, 10, 10) == 2


def test_deterministic_given_seed(tmp_path):
    a = _dataset(tmp_path / "a", _lengths(1), seed=11)
    b = _dataset(tmp_path / "b", _lengths(1), seed=11)
    c = _dataset(tmp_path / "c", _lengths(1), seed=12)
    assert np.array_equal(a.shuffle_index, b.shuffle_index) and np.array_equal(a.document_index, b.document_index)
    assert not np.array_equal(a.document_index, c.document_index)


def test_indices_are_cached_and_reused(tmp_path, monkeypatch):
    first = _dataset(tmp_path, _lengths(2), num_samples=50)
    files = sorted(os.listdir(tmp_path / "cache"))
    assert sum(f.endswith(".npy") for f in files) == 3 and not any("partial" in f for f in files)

    def boom(*a, **k):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(gpt_dataset, "build_sample_index", boom)
    again = _dataset(tmp_path, _lengths(2), num_samples=50)
    assert np.array_equal(first.sample_index, again.sample_index)
    with pytest.raises(AssertionError, match="rebuilt"):  # other inputs -> another key -> a build
        _dataset(tmp_path, _lengths(2), num_samples=50, seq_len=SEQ + 1)


def _build_in_child(tmp):
    ix = IndexedDataset(str(tmp / "pos"))
    ds = GPTDataset(ix, (0, ix.num_documents), seq_len=SEQ, num_samples=300, seed=3, cache_dir=str(tmp / "cache"))
    return ds.sample_index.tobytes() + ds.shuffle_index.tobytes()


def test_concurrent_ranks_build_once(tmp_path, monkeypatch):
    lengths = _lengths(4)
    position_dataset(str(tmp_path / "pos"), lengths)
    log = tmp_path / "builds.log"
    monkeypatch.setattr(gpt_dataset, "build_sample_index", logging_calls(gpt_dataset.build_sample_index, log))
    with mp.get_context("fork").Pool(3) as pool:
        results = pool.map(_build_in_child, [tmp_path] * 3)
    assert len(set(results)) == 1
    assert open(log).read().count("built") == 1


def test_build_sample_index_skips_empty_documents():
    idx = build_sample_index(np.array([0, 4, 0, 0, 3, 5]), 3, 3)
    # positions 0, 3, 6, 9 -> (doc 1, 0), (doc 1, 3), (doc 4, 2), (doc 5, 2)
    assert idx.tolist() == [[1, 0], [1, 3], [4, 2], [5, 2]]


def test_split_ranges_megatron_rounding():
    assert split_ranges(1000, [0.969, 0.03, 0.001]) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(10, [1.0, 0.0, 0.0]) == [(0, 10), (10, 10), (10, 10)]
    r = split_ranges(557, [0.969, 0.03, 0.001])
    assert r[0][0] == 0 and r[-1][1] == 557 and all(a <= b for a, b in r)


def test_token_outside_the_vocabulary_is_named_not_passed_on(tmp_path):
    from megatrain.data.indexed import DataFormatError

    ix = IndexedDataset(position_dataset(str(tmp_path / "pos"), [40] * 10))  # token ids 0..399
    ix.vocab_size = 200  # what loader.open_dataset sets from model.vocab_size
    ds = GPTDataset(ix, (0, ix.num_documents), seq_len=SEQ, num_samples=None, seed=3,
                    cache_dir=str(tmp_path / "cache"), name="train")
    ok = bad = 0
    for i in range(len(ds)):
        try:
            assert ds[i].max() < 200
            ok += 1
        except DataFormatError as e:
            assert ix.bin_path in str(e) and "outside the vocabulary [0, 200)" in str(e) and "train split" in str(e)
            bad += 1
    assert ok and bad
