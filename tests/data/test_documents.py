"""Document layout of packed samples: boundaries from the sample index (no EOD scan), position ids and
the eod loss mask in the loader; the default batches are unchanged."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from megatrain.config import DataConfig
from megatrain.data.gpt_dataset import GPTDataset
from megatrain.data.indexed import IndexedDataset
from megatrain.data.loader import IGNORE_INDEX, build_datasets, build_micro_batches, document_positions
from megatrain.parallel.cross_entropy import IGNORE_INDEX as LOSS_IGNORE_INDEX
from tests.data.helpers import position_dataset

SEQ = 9
LENGTHS = [int(x) for x in np.random.default_rng(4).choice([0, 1, 2, 3, 5, 9, 17, 40], size=80)]


def _true_starts(window: np.ndarray, lengths: list[int]) -> np.ndarray:
    """Where a document begins inside a window of a position dataset (token value = global position): the
    document changes, or the same one starts over (epochs repeat documents, sometimes back to back)."""
    cum = np.cumsum([0] + lengths)
    doc = np.searchsorted(cum, window, side="right") - 1
    return np.flatnonzero((doc[1:] != doc[:-1]) | (window[1:] != window[:-1] + 1)) + 1


@pytest.fixture(scope="module")
def pos_prefix(tmp_path_factory) -> str:
    return position_dataset(str(tmp_path_factory.mktemp("docs") / "pos"), LENGTHS)


def test_document_starts_match_the_tokens_over_several_epochs(pos_prefix, tmp_path):
    ix = IndexedDataset(pos_prefix)
    ds = GPTDataset(ix, (0, ix.num_documents), seq_len=SEQ, num_samples=3 * sum(LENGTHS) // SEQ, seed=1,
                    cache_dir=str(tmp_path))
    assert ds.num_epochs >= 3
    crossing = 0
    for i in range(len(ds)):
        starts = ds.document_starts(i)
        assert starts.dtype == np.int64
        assert starts.tolist() == _true_starts(ds[i], LENGTHS).tolist(), i
        crossing += starts.size > 0
    assert crossing > len(ds) // 4  # the test data really packs several documents per sample


def test_document_positions():
    assert document_positions(np.array([3, 5], dtype=np.int64), 8).tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert document_positions(np.array([8], dtype=np.int64), 8).tolist() == list(range(8))  # starts at a label
    assert document_positions(np.zeros(0, dtype=np.int64), 4).tolist() == [0, 1, 2, 3]


def _datasets(prefix: str, cache: str, path: str | None = None):
    cfg = DataConfig(path=path or prefix, split="1,0,0", cache_dir=cache)
    return build_datasets(cfg, seq_len=SEQ, num_samples={"train": 64}, seed=0, vocab_size=200_000,
                          tokenizer_sha256=None)["train"]


def _batches(ds, n: int = 6, **kw) -> list[tuple]:
    it = build_micro_batches(ds, micro_batch_size=4, global_batch_size=8, dp_rank=1, dp_size=2, consumed_samples=8,
                             **kw)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def test_loader_carries_positions_and_masks_the_loss_after_a_boundary(pos_prefix, tmp_path):
    assert IGNORE_INDEX == LOSS_IGNORE_INDEX
    # a dataset without its sidecar (and with no EOD token at all): the layout comes from the index
    bare = str(tmp_path / "bare")
    for ext in (".bin", ".idx"):
        os.link(pos_prefix + ext, bare + ext)
    ds = _datasets(bare, str(tmp_path / "cache"))
    plain = _batches(ds)
    laid = _batches(ds, document_layout=True, eod_mask_loss=True)
    only_pos = _batches(ds, document_layout=True)
    assert all(len(b) == 2 for b in plain) and all(len(b) == 3 for b in laid)
    masked = 0
    for (tokens, labels), (t2, l2, pos), (_, l3, p3) in zip(plain, laid, only_pos):
        assert torch.equal(tokens, t2) and torch.equal(labels, l3) and torch.equal(pos, p3)
        assert pos.shape == tokens.shape and pos.dtype == torch.int64
        for row in range(tokens.shape[0]):
            window = np.concatenate([tokens[row].numpy(), labels[row, -1:].numpy()])
            starts = _true_starts(window, LENGTHS)
            assert pos[row].tolist() == document_positions(starts, SEQ).tolist()
            expect = labels[row].clone()
            expect[starts - 1] = IGNORE_INDEX
            assert torch.equal(l2[row], expect)
            masked += starts.size
    assert masked > 0


def test_workers_and_blends_give_the_same_layout(pos_prefix, tmp_path):
    ds = _datasets(pos_prefix, str(tmp_path / "cache"))
    thread = _batches(ds, 3, document_layout=True, eod_mask_loss=True)
    workers = _batches(ds, 3, document_layout=True, eod_mask_loss=True, num_workers=1)
    for a, b in zip(thread, workers):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    blend = _datasets(pos_prefix, str(tmp_path / "cache"), path=f"1 {pos_prefix} 1 {pos_prefix}")
    for i in range(20):
        part = blend.datasets[blend.dataset_index[i]]
        assert blend.document_starts(i).tolist() == _true_starts(blend[i], LENGTHS).tolist()
        assert blend.document_starts(i).tolist() == part.document_starts(blend.dataset_sample_index[i]).tolist()


def test_a_dataset_without_document_starts_is_refused():
    class Plain:
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return np.zeros(SEQ + 1, dtype=np.int64)

    with pytest.raises(TypeError, match="document_starts"):
        build_micro_batches(Plain(), micro_batch_size=1, global_batch_size=1, dp_rank=0, dp_size=1,
                            consumed_samples=0, document_layout=True)
