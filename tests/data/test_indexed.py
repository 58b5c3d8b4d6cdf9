"""The .bin/.idx format: golden bytes from the spec table, round trips, zero-copy reads, merges, sidecar."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from megatrain.data.indexed import (DataFormatError, IndexedDataset, IndexedDatasetBuilder, best_dtype,
                                    merge_datasets, read_sidecar)
from tests.data.helpers import make_dataset, random_documents

# Two documents: doc 0 = sequences [1 2 3] [4 5], doc 1 = sequence [6].
GOLDEN_SEQS = [[[1, 2, 3], [4, 5]], [[6]]]


def golden_bytes(code: int, fmt: str, itemsize: int) -> tuple[bytes, bytes]:
    """The spec's table, field by field."""
    lengths, docs = [3, 2, 1], [0, 2, 3]
    pointers = [0, 3 * itemsize, 5 * itemsize]
    idx = (b"MMIDIDX\x00\x00"                       # magic, offset 0
           + struct.pack("<Q", 1)                    # version, offset 9
           + struct.pack("<B", code)                 # dtype code, offset 17
           + struct.pack("<Q", 3)                    # sequence count N, offset 18
           + struct.pack("<Q", 3)                    # document count M = documents + 1, offset 26
           + struct.pack("<3i", *lengths)            # int32[N] lengths, offset 34
           + struct.pack("<3q", *pointers)           # int64[N] byte pointers, offset 34 + 4N
           + struct.pack("<3q", *docs))              # int64[M] document indices, offset 34 + 12N
    return idx, struct.pack(f"<6{fmt}", 1, 2, 3, 4, 5, 6)


@pytest.mark.parametrize("vocab,code,fmt,size", [(32000, 8, "H", 2), (128256, 4, "i", 4)])
def test_golden_bytes_read_and_write(tmp_path, vocab, code, fmt, size):
    idx, binary = golden_bytes(code, fmt, size)
    hand = str(tmp_path / "hand")
    with open(hand + ".idx", "wb") as f:
        f.write(idx)
    with open(hand + ".bin", "wb") as f:
        f.write(binary)
    ds = IndexedDataset(hand)
    assert (len(ds), ds.num_documents, ds.num_tokens) == (3, 2, 6)
    assert ds.dtype == np.dtype(np.uint16 if code == 8 else np.int32)
    assert ds.get(0).tolist() == [1, 2, 3] and ds.get(1).tolist() == [4, 5] and ds.get(2).tolist() == [6]
    assert ds.get_document(0).tolist() == [1, 2, 3, 4, 5] and ds.get_document(1).tolist() == [6]
    assert ds.sidecar is None

    ours = make_dataset(str(tmp_path / "ours"), GOLDEN_SEQS, vocab_size=vocab)
    assert open(ours + ".idx", "rb").read() == idx
    assert open(ours + ".bin", "rb").read() == binary


def test_dtype_rule():
    assert best_dtype(32000) == np.uint16 and best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32 and best_dtype(128256) == np.int32
    with pytest.raises(ValueError, match="uint16"):
        IndexedDatasetBuilder("/tmp/never", vocab_size=70000, dtype=np.uint16)


@pytest.mark.parametrize("vocab", [50000, 150000])
def test_round_trip(tmp_path, vocab):
    rng = np.random.default_rng(vocab)
    docs = [[rng.integers(0, vocab, rng.integers(0, 50)).tolist() for _ in range(rng.integers(1, 4))]
            for _ in range(40)]
    docs.append([[]])  # an empty document is legal
    ds = IndexedDataset(make_dataset(str(tmp_path / "rt"), docs, vocab_size=vocab), verify="full")
    assert ds.dtype == best_dtype(vocab)
    flat = [s for d in docs for s in d]
    assert len(ds) == len(flat) and ds.num_documents == len(docs)
    for i, s in enumerate(flat):
        assert ds.get(i).tolist() == s
    for j, d in enumerate(docs):
        assert ds.get_document(j).tolist() == [t for s in d for t in s]
    assert ds.num_tokens == sum(map(len, flat))


def test_reads_are_zero_copy_views(tmp_path):
    ds = IndexedDataset(make_dataset(str(tmp_path / "v"), [[10, 11, 12, 13, 14], [20, 21]]))
    part = ds.get(0, offset=1, length=3)
    assert part.tolist() == [11, 12, 13]
    assert np.shares_memory(part, ds.tokens) and not part.flags.writeable
    assert np.shares_memory(ds.get_document(1), ds.tokens)
    with pytest.raises(IndexError):
        ds.get(0, offset=3, length=3)
    with pytest.raises(IndexError):
        ds.get(2)


def test_merge_equals_build_at_once(tmp_path):
    rng = np.random.default_rng(0)
    docs = random_documents(90, rng)
    whole = make_dataset(str(tmp_path / "whole"), docs)
    shards = [make_dataset(str(tmp_path / f"shard{i}"), docs[a:b])
              for i, (a, b) in enumerate([(0, 30), (30, 31), (31, 31), (31, 90)])]  # incl. an empty shard
    merge_datasets(shards, str(tmp_path / "merged"))
    for ext in (".bin", ".idx"):
        assert open(whole + ext, "rb").read() == open(str(tmp_path / "merged") + ext, "rb").read()
    assert read_sidecar(str(tmp_path / "merged"))["num_documents"] == 90


def test_merge_refuses_mixed_tokenizers(tmp_path):
    a = make_dataset(str(tmp_path / "a"), [[1, 2]], tokenizer_sha256="a" * 64)
    b = make_dataset(str(tmp_path / "b"), [[3]], tokenizer_sha256="b" * 64)
    with pytest.raises(DataFormatError, match="tokenizer_sha256"):
        merge_datasets([a, b], str(tmp_path / "m"))
    assert not os.path.exists(str(tmp_path / "m.idx")) and not os.path.exists(str(tmp_path / "m.bin"))


def test_merge_checks_the_tokens_of_a_shard_without_sidecar(tmp_path):
    a = make_dataset(str(tmp_path / "a"), [[1, 2], [3]], vocab_size=400)
    fits = make_dataset(str(tmp_path / "fits"), [[399, 0]], vocab_size=1000)
    other = make_dataset(str(tmp_path / "other"), [[5, 432]], vocab_size=1000)  # another tokenizer's ids
    for p in (fits, other):
        os.remove(p + ".json")
    merge_datasets([a, fits], str(tmp_path / "ok"))
    assert read_sidecar(str(tmp_path / "ok"))["vocab_size"] == 400
    with pytest.raises(DataFormatError, match=r"other\.bin: token id 432 is outside the vocabulary \[0, 400\)"):
        merge_datasets([a, other], str(tmp_path / "m"))
    assert not os.path.exists(str(tmp_path / "m.idx")) and not os.path.exists(str(tmp_path / "m.bin"))


def test_sidecar_contents(tmp_path):
    prefix = make_dataset(str(tmp_path / "s"), [[1, 2, 3], [4]], vocab_size=500, tokenizer_sha256="f" * 64,
                          eod_id=2, sources=["x.jsonl"])
    side = read_sidecar(prefix)
    assert side["vocab_size"] == 500 and side["eod_id"] == 2 and side["dtype"] == "uint16"
    assert (side["num_tokens"], side["num_documents"], side["num_sequences"]) == (4, 2, 2)
    assert side["tokenizer_sha256"] == "f" * 64 and side["sources"] == ["x.jsonl"] and side["tool"]
    assert len(side["idx_sha256"]) == 64 and len(side["bin_sha256"]) == 64
    IndexedDataset(prefix, verify="full")  # hashes match


def test_interrupted_build_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "x")
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(prefix, vocab_size=100) as b:
            b.add_document([1, 2, 3])
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_rebuild_replaces_previous_dataset(tmp_path):
    prefix = make_dataset(str(tmp_path / "r"), [[1, 2, 3]])
    make_dataset(prefix, [[7], [8, 9]])
    assert IndexedDataset(prefix).get_document(1).tolist() == [8, 9]
    assert sorted(os.listdir(tmp_path)) == ["r.bin", "r.idx", "r.json"]


def test_builder_rejects_out_of_vocab_tokens(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "o"), vocab_size=10) as b:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            b.add_sequence([1, 10])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            b.add_sequence([-1])
        b.abort()


def test_multimodal_modes_are_tolerated(tmp_path):
    prefix = make_dataset(str(tmp_path / "mm"), [[1, 2], [3]])
    os.remove(prefix + ".json")
    with open(prefix + ".idx", "ab") as f:
        f.write(b"\x00\x00")  # int8 modes, one per sequence
    ds = IndexedDataset(prefix)
    assert ds.multimodal and ds.get(1).tolist() == [3]
