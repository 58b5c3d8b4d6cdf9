"""Malformed inputs: each is rejected by build_datasets (i.e. before any training) and by
``inspect_data verify``, with a message that names the file and the field at fault."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from megatrain.config import ConfigError, DataConfig
from megatrain.data.indexed import DataFormatError, IndexedDatasetBuilder
from megatrain.data.loader import build_datasets
from tests.data.helpers import make_dataset, random_documents
from tools import inspect_data

VOCAB = 1000
N_DOCS = 40


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _truncate(path: str, drop: int) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - drop)


def _append(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def _ptr_offset(i: int) -> int:
    return 34 + 4 * N_DOCS + 8 * i


def _doc_offset(j: int) -> int:
    return 34 + 12 * N_DOCS + 8 * j


def _edit_sidecar(prefix: str, **fields) -> None:
    with open(prefix + ".json") as f:
        side = json.load(f)
    side.update(fields)
    with open(prefix + ".json", "w") as f:
        json.dump(side, f)


# (id, how to break the dataset, build_datasets overrides, field named in the message)
CASES = [
    ("bad-magic", lambda p: _patch(p + ".idx", 0, b"NOTANIDX\x00"), {}, "magic"),
    ("bad-version", lambda p: _patch(p + ".idx", 9, struct.pack("<Q", 2)), {}, "version"),
    ("dtype-code-6", lambda p: _patch(p + ".idx", 17, bytes([6])), {}, "dtype code"),
    ("dtype-code-7", lambda p: _patch(p + ".idx", 17, bytes([7])), {}, "dtype code"),
    ("dtype-code-99", lambda p: _patch(p + ".idx", 17, bytes([99])), {}, "dtype code"),
    ("truncated-idx", lambda p: _truncate(p + ".idx", 8), {}, "file size"),
    ("header-only-idx", lambda p: _truncate(p + ".idx", os.path.getsize(p + ".idx") - 20), {}, "header"),
    ("counts-larger-than-file", lambda p: _patch(p + ".idx", 18, struct.pack("<Q", 10**6)), {}, "file size"),
    ("truncated-bin", lambda p: _truncate(p + ".bin", 2), {}, "file size"),
    ("extra-bytes-in-bin", lambda p: _append(p + ".bin", b"\x00\x00"), {}, "file size"),
    ("wrong-pointer", lambda p: _patch(p + ".idx", _ptr_offset(5), struct.pack("<q", 7)), {}, "sequence pointers"),
    ("doc-indices-decreasing", lambda p: _patch(p + ".idx", _doc_offset(3), struct.pack("<q", 1)), {},
     "document indices"),
    ("doc-indices-not-ending-at-N", lambda p: _patch(p + ".idx", _doc_offset(N_DOCS), struct.pack("<q", N_DOCS - 1)),
     {}, "document indices"),
    ("doc-indices-not-starting-at-0", lambda p: _patch(p + ".idx", _doc_offset(0), struct.pack("<q", 1)), {},
     "document indices"),
    ("negative-length", lambda p: _patch(p + ".idx", 34 + 4 * 3, struct.pack("<i", -4)), {}, "sequence lengths"),
    ("token-out-of-vocab-full", lambda p: _patch(p + ".bin", 10, struct.pack("<H", VOCAB + 5)), {"verify": "full"},
     "outside the vocabulary"),
    ("uint16-with-vocab-65500", lambda p: None, {"vocab_size": 65500}, "dtype code"),
    ("tokenizer-hash-mismatch", lambda p: None, {"tokenizer_sha256": "b" * 64}, "tokenizer_sha256"),
    ("sidecar-vocab-larger", lambda p: _edit_sidecar(p, vocab_size=VOCAB * 2), {}, "vocab_size"),
    ("sidecar-stale-counts", lambda p: _edit_sidecar(p, num_tokens=1), {}, "num_tokens"),
    ("sidecar-not-json", lambda p: open(p + ".json", "w").write("{oops"), {}, "sidecar"),
    ("bin-hash-mismatch-full", lambda p: _patch(p + ".bin", 0, struct.pack("<H", 3)), {"verify": "full"},
     "bin_sha256"),
    ("missing-bin", lambda p: os.remove(p + ".bin"), {}, "no such file"),
    ("missing-idx", lambda p: os.remove(p + ".idx"), {}, "no such file"),
]


@pytest.fixture
def good(tmp_path):
    rng = np.random.default_rng(0)
    docs = random_documents(N_DOCS, rng, vocab=VOCAB, min_len=20, max_len=60)
    docs[0][0] = 1  # bin-hash-mismatch writes token 3 over it: still in vocabulary, only the hash differs
    return make_dataset(str(tmp_path / "good"), docs, vocab_size=VOCAB, tokenizer_sha256="a" * 64)


def _build(prefix: str, *, vocab_size=VOCAB, tokenizer_sha256="a" * 64, verify="sizes", seq_len=16, path=None):
    cfg = DataConfig(path=path or prefix, split="969,30,1", verify=verify)
    return build_datasets(cfg, seq_len=seq_len, num_samples={"train": 10}, seed=1, vocab_size=vocab_size,
                          tokenizer_sha256=tokenizer_sha256)


def test_the_good_dataset_builds(good):
    assert len(_build(good)["train"]) >= 10


@pytest.mark.parametrize("name,breaker,kwargs,field", CASES, ids=[c[0] for c in CASES])
def test_malformed_dataset_rejected(good, name, breaker, kwargs, field):
    breaker(good)
    with pytest.raises(DataFormatError) as info:
        _build(good, **kwargs)
    msg = str(info.value)
    assert "good." in msg, f"message does not name the file: {msg}"
    assert field in msg, f"message does not name the field {field!r}: {msg}"


FILE_CASES = [c for c in CASES if c[0] not in ("tokenizer-hash-mismatch", "sidecar-vocab-larger")]


@pytest.mark.parametrize("name,breaker,kwargs,field", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_inspect_verify_fails(good, capsys, name, breaker, kwargs, field):
    breaker(good)
    args = ["verify", good, "--full"] + (["--vocab-size", str(kwargs["vocab_size"])] if "vocab_size" in kwargs else [])
    assert inspect_data.main(args) == 1
    assert field in capsys.readouterr().err


def test_inspect_verify_passes_good(good, capsys):
    assert inspect_data.main(["verify", good, "--full"]) == 0
    assert "OK" in capsys.readouterr().out


def test_empty_dataset_rejected(tmp_path):
    prefix = str(tmp_path / "empty")
    with IndexedDatasetBuilder(prefix, vocab_size=VOCAB) as b:
        b.finalize()
    with pytest.raises(DataFormatError, match=r"empty\.idx: sequence lengths: the dataset holds no tokens"):
        _build(prefix)


def test_sequence_longer_than_split_rejected(good):
    with pytest.raises(DataFormatError, match=r"good.*train split.*train\.seq_len"):
        _build(good, seq_len=100_000)


def test_requested_tiny_valid_split_rejected(good):
    cfg = DataConfig(path=good, split="98,1,1")
    with pytest.raises(DataFormatError, match=r"good.*valid split.*train\.seq_len"):
        build_datasets(cfg, seq_len=64, num_samples={"train": 10, "valid": 5}, seed=1, vocab_size=VOCAB,
                       tokenizer_sha256=None)


@pytest.mark.parametrize("path,match", [
    ("-1 {p} 2 {p}", "negative"),
    ("0 {p} 0.0 {p}", "sum to zero"),
    ("1 {p} 2", "odd number"),
    ("x {p} 1 {p}", "not a number"),
])
def test_bad_blend_weights_rejected(good, path, match):
    with pytest.raises(ConfigError, match=rf"data\.path.*{match}"):
        _build(good, path=path.format(p=good))


@pytest.mark.parametrize("split", ["1,2,3,4", "a,b", "0,0,0", "-1,2,0"])
def test_bad_split_rejected(good, split):
    cfg = DataConfig(path=good, split=split)
    with pytest.raises(ConfigError, match="data.split"):
        build_datasets(cfg, seq_len=16, num_samples={"train": 1}, seed=1, vocab_size=VOCAB, tokenizer_sha256=None)
