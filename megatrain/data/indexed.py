"""Megatron's memory-mapped indexed token dataset (PREFIX.bin / PREFIX.idx) plus megatrain's JSON sidecar.

The byte layout is specified in shared/spec/indexed-dataset.md; files written here are byte-identical to the
ones Megatron-LM's builder writes for the same sequences and dtype, and every file Megatron (or
Megatron-DeepSpeed, GPT-NeoX, NeMo) writes for a token dataset reads here.

Reading is zero-copy: the .bin file is mapped once and ``get`` returns read-only views into the mapping.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
from typing import Any, Iterable, Optional

import numpy as np

from megatrain.files import atomic_write_json, sha256_file

logger = logging.getLogger(__name__)

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # magic 9 + version 8 + dtype code 1 + N 8 + M 8
SIDECAR_FORMAT = "megatrain-indexed-dataset"
SIDECAR_VERSION = 1
TOOL_VERSION = "megatrain-data 0.1.0"

DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
# Megatron's rule: below this vocabulary size tokens are stored as uint16, otherwise int32.
UINT16_VOCAB_LIMIT = 65500

_VERIFY_MODES = ("sizes", "full")
_CHUNK_TOKENS = 1 << 24  # bounds memory when a full check reads every token


class DataFormatError(ValueError):
    """A dataset file that cannot be used as it is. The message names the file, the field and what to do."""


def best_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron picks for a vocabulary: uint16 below 65,500 entries, int32 otherwise."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size} must be positive")
    if vocab_size < UINT16_VOCAB_LIMIT:
        return np.dtype(np.uint16)
    if vocab_size <= np.iinfo(np.int32).max:
        return np.dtype(np.int32)
    raise ValueError(f"vocab_size={vocab_size} does not fit int32 token ids")


def data_file_paths(prefix: str) -> tuple[str, str, str]:
    """(PREFIX.bin, PREFIX.idx, PREFIX.json)."""
    return prefix + ".bin", prefix + ".idx", prefix + ".json"


def normalize_prefix(path: str) -> str:
    """Accept ``P``, ``P.bin`` or ``P.idx`` and return ``P``."""
    for ext in (".bin", ".idx", ".json"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


# --------------------------------------------------------------------------- sidecar


def read_sidecar(prefix: str) -> Optional[dict]:
    """PREFIX.json as a dict, or None when the dataset has no sidecar (e.g. one written by Megatron)."""
    path = data_file_paths(prefix)[2]
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            side = json.load(f)
    except (OSError, ValueError) as e:
        raise DataFormatError(f"{path}: sidecar is not readable JSON ({e}); delete it or re-run preprocessing") from None
    if not isinstance(side, dict):
        raise DataFormatError(f"{path}: sidecar must be a JSON object; delete it or re-run preprocessing")
    return side


def write_json_atomic(path: str, obj: Any) -> None:
    atomic_write_json(path, obj)


# --------------------------------------------------------------------------- reader


class IndexedDataset:
    """Read-only view of PREFIX.bin / PREFIX.idx.

    ``len(ds)`` is the number of sequences. ``verify="sizes"`` runs every structural check of the spec
    (cheap: it reads the index, not the tokens); ``verify="full"`` also reads every token and checks it
    against ``vocab_size`` (taken from the sidecar when not given) and the sidecar's content hashes.
    """

    def __init__(self, prefix: str, verify: str = "sizes", vocab_size: Optional[int] = None):
        if verify not in _VERIFY_MODES:
            raise ValueError(f"verify={verify!r}: choose one of {', '.join(_VERIFY_MODES)}")
        self.prefix = normalize_prefix(str(prefix))
        self.bin_path, self.idx_path, self.sidecar_path = data_file_paths(self.prefix)
        self.verify_mode = verify
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise DataFormatError(f"{path}: no such file (dataset prefix {self.prefix!r}); check data.path "
                                      f"or run tools/preprocess_data.py to create it")
        self._open_index()
        self._check_index()
        self._open_bin()
        self.sidecar = read_sidecar(self.prefix)
        self._check_sidecar()
        self.vocab_size = vocab_size if vocab_size is not None else (self.sidecar or {}).get("vocab_size")
        if self.vocab_size is not None:
            self.check_vocab_size(int(self.vocab_size))
        if verify == "full":
            self.verify_tokens()

    # -- opening

    def _open_index(self) -> None:
        path = self.idx_path
        size = os.path.getsize(path)
        if size < HEADER_SIZE:
            raise DataFormatError(f"{path}: header: file has {size} bytes, a header needs {HEADER_SIZE}; the index "
                                  f"is truncated, re-run preprocessing")
        with open(path, "rb") as f:
            header = f.read(HEADER_SIZE)
        if header[:9] != MAGIC:
            raise DataFormatError(f"{path}: magic: expected {MAGIC!r}, found {header[:9]!r}; this is not a "
                                  f"Megatron indexed dataset index (.idx)")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise DataFormatError(f"{path}: version: expected {VERSION}, found {version}; only version 1 indexes "
                                  f"are supported")
        code = header[17]
        if code in (6, 7):
            raise DataFormatError(f"{path}: dtype code: {code} is a floating-point code (GPT-NeoX swaps 6 and 7); "
                                  f"token datasets must be integral, re-run preprocessing")
        if code not in DTYPE_CODES:
            raise DataFormatError(f"{path}: dtype code: unknown code {code} (known: {sorted(DTYPE_CODES)}); the "
                                  f"index is corrupt or from an unsupported writer")
        self.dtype = np.dtype(DTYPE_CODES[code])
        self.num_sequences, self._num_doc_entries = struct.unpack("<QQ", header[18:34])
        n, m = self.num_sequences, self._num_doc_entries
        if m < 1:
            raise DataFormatError(f"{path}: document count: is 0 but must be at least 1 (it counts documents + 1); "
                                  f"the index is corrupt, re-run preprocessing")
        expected = HEADER_SIZE + 12 * n + 8 * m
        if size == expected + n and n > 0:
            self.multimodal = True  # sequence modes trail the index; token reading ignores them
        elif size != expected:
            raise DataFormatError(
                f"{path}: file size: sequence count N={n} and document count M={m} need {expected} bytes "
                f"(34 + 12N + 8M) but the file has {size}; the index is "
                f"{'truncated or its counts are too large' if size < expected else 'followed by extra bytes'}, "
                f"re-run preprocessing")
        else:
            self.multimodal = False
        self._idx_map = np.memmap(path, dtype=np.uint8, mode="r") if size else None
        buf = self._idx_map
        self.sequence_lengths = np.frombuffer(buf, dtype="<i4", count=n, offset=HEADER_SIZE)
        self.sequence_pointers = np.frombuffer(buf, dtype="<i8", count=n, offset=HEADER_SIZE + 4 * n)
        self.document_indices = np.frombuffer(buf, dtype="<i8", count=m, offset=HEADER_SIZE + 12 * n)

    def _check_index(self) -> None:
        path, lengths, ptrs, docs = self.idx_path, self.sequence_lengths, self.sequence_pointers, self.document_indices
        n = self.num_sequences
        if n and int(lengths.min()) < 0:
            i = int(np.argmin(lengths))
            raise DataFormatError(f"{path}: sequence lengths: sequence {i} has negative length {int(lengths[i])}; "
                                  f"the index is corrupt, re-run preprocessing")
        if n:
            expected = np.empty(n, dtype=np.int64)
            expected[0] = 0
            np.cumsum(lengths[:-1], dtype=np.int64, out=expected[1:])
            expected *= self.dtype.itemsize
            bad = np.flatnonzero(ptrs != expected)
            if bad.size:
                i = int(bad[0])
                raise DataFormatError(f"{path}: sequence pointers: pointer {i} is {int(ptrs[i])}, expected "
                                      f"{int(expected[i])} (prefix sum of lengths x {self.dtype.itemsize} bytes, "
                                      f"starting at 0); the index is corrupt, re-run preprocessing")
        if int(docs[0]) != 0:
            raise DataFormatError(f"{path}: document indices: first entry is {int(docs[0])}, must be 0; the index "
                                  f"is corrupt, re-run preprocessing")
        if docs.size > 1:
            dec = np.flatnonzero(np.diff(docs) < 0)
            if dec.size:
                j = int(dec[0])
                raise DataFormatError(f"{path}: document indices: entry {j + 1} ({int(docs[j + 1])}) is smaller "
                                      f"than entry {j} ({int(docs[j])}); they must never decrease, re-run "
                                      f"preprocessing")
        if int(docs[-1]) != n:
            raise DataFormatError(f"{path}: document indices: last entry is {int(docs[-1])}, must equal the "
                                  f"sequence count N={n}; the index is corrupt, re-run preprocessing")
        self.num_tokens = int(lengths.sum(dtype=np.int64))

    def _open_bin(self) -> None:
        size = os.path.getsize(self.bin_path)
        expected = self.num_tokens * self.dtype.itemsize
        if size != expected:
            what = "is truncated" if size < expected else "has extra bytes after the last sequence"
            raise DataFormatError(f"{self.bin_path}: file size: the index ({self.idx_path}) says "
                                  f"{self.num_tokens} tokens x {self.dtype.itemsize} bytes = {expected} bytes, the "
                                  f"file has {size}; it {what}, re-run preprocessing")
        if size == 0:
            self._bin_map = None
            self.tokens = np.empty(0, dtype=self.dtype)
        else:
            with open(self.bin_path, "rb") as f:
                self._bin_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            # A plain ndarray over the mapping: slicing it is far cheaper than slicing np.memmap.
            self.tokens = np.frombuffer(self._bin_map, dtype=self.dtype.newbyteorder("<"))

    def _check_sidecar(self) -> None:
        side = self.sidecar
        if side is None:
            return
        path = self.sidecar_path
        actual = {"num_tokens": self.num_tokens, "num_sequences": self.num_sequences,
                  "num_documents": self.num_documents, "dtype": self.dtype.name}
        for field, value in actual.items():
            if field in side and side[field] != value:
                raise DataFormatError(f"{path}: {field}: sidecar says {side[field]!r} but {self.idx_path} has "
                                      f"{value!r}; the sidecar belongs to another dataset, re-run preprocessing")

    def check_vocab_size(self, vocab_size: int) -> None:
        """Raise when the token dtype cannot hold ids of this vocabulary (e.g. uint16 data, 128K vocabulary)."""
        if self.dtype.kind not in "iu":
            return
        limit = UINT16_VOCAB_LIMIT if self.dtype == np.uint16 else int(np.iinfo(self.dtype).max) + 1
        if vocab_size > limit or (self.dtype == np.uint16 and vocab_size >= UINT16_VOCAB_LIMIT):
            raise DataFormatError(f"{self.idx_path}: dtype code: tokens are stored as {self.dtype.name}, which "
                                  f"cannot hold a vocabulary of {vocab_size} (uint16 is for vocabularies below "
                                  f"{UINT16_VOCAB_LIMIT}); re-run preprocessing with this tokenizer")

    # -- full verification

    def verify_tokens(self, vocab_size: Optional[int] = None) -> None:
        """Read every token: each must be in [0, vocab_size); also checks the sidecar's content hashes."""
        vocab = vocab_size if vocab_size is not None else self.vocab_size
        if vocab is None:
            raise DataFormatError(f"{self.sidecar_path}: vocab_size: a full check needs the vocabulary size and "
                                  f"the dataset has no sidecar; pass vocab_size (inspect_data --vocab-size N)")
        vocab = int(vocab)
        for start in range(0, self.num_tokens, _CHUNK_TOKENS):
            chunk = self.tokens[start:start + _CHUNK_TOKENS]
            lo, hi = int(chunk.min()), int(chunk.max())
            if lo < 0 or hi >= vocab:
                bad = int(np.flatnonzero((chunk < 0) | (chunk >= vocab))[0]) + start
                seq = int(np.searchsorted(self.sequence_pointers, bad * self.dtype.itemsize, side="right")) - 1
                raise DataFormatError(f"{self.bin_path}: token {bad} (sequence {seq}) is {int(self.tokens[bad])}, "
                                      f"outside the vocabulary [0, {vocab}); the data was tokenized with another "
                                      f"tokenizer or is corrupt")
        side = self.sidecar or {}
        for field, path in (("idx_sha256", self.idx_path), ("bin_sha256", self.bin_path)):
            if side.get(field) and sha256_file(path) != side[field]:
                raise DataFormatError(f"{self.sidecar_path}: {field}: {path} does not match the hash recorded at "
                                      f"preprocessing; the file changed or is corrupt, re-run preprocessing")

    # -- access

    @property
    def sequence_starts(self) -> np.ndarray:
        """Token offset of every sequence in .bin (computed on demand: N x 8 bytes of memory)."""
        return self.sequence_pointers // self.dtype.itemsize

    @property
    def num_documents(self) -> int:
        return self._num_doc_entries - 1

    def __len__(self) -> int:
        return self.num_sequences

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens of sequence ``i`` from ``offset`` (``length`` of them, default: to its end); a read-only view."""
        if not -self.num_sequences <= i < self.num_sequences:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({self.num_sequences} sequences)")
        size = int(self.sequence_lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"offset={offset} length={length} outside sequence {i} of length {size}")
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return self.tokens[start:start + length]

    def get_document(self, j: int) -> np.ndarray:
        """All tokens of document ``j`` (its sequences are contiguous in .bin); a read-only view."""
        if not -self.num_documents <= j < self.num_documents:
            raise IndexError(f"document {j} out of range for {self.prefix} ({self.num_documents} documents)")
        j %= self.num_documents
        first, end = int(self.document_indices[j]), int(self.document_indices[j + 1])
        if first == end:
            return self.tokens[0:0]
        start = int(self.sequence_pointers[first]) // self.dtype.itemsize
        stop = int(self.sequence_pointers[end - 1]) // self.dtype.itemsize + int(self.sequence_lengths[end - 1])
        return self.tokens[start:stop]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def __getstate__(self) -> dict:
        # Worker processes reopen the files instead of pickling the mappings (the checks already ran here).
        return {"prefix": self.prefix, "vocab_size": self.vocab_size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"], verify="sizes", vocab_size=state["vocab_size"])

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, dtype={self.dtype.name}, sequences={self.num_sequences}, "
                f"documents={self.num_documents}, tokens={self.num_tokens})")


# --------------------------------------------------------------------------- builder


class IndexedDatasetBuilder:
    """Writes PREFIX.bin / PREFIX.idx / PREFIX.json, atomically.

    Everything goes to ``*.partial-<pid>`` files first; :meth:`finalize` renames them with .idx last, so an
    interrupted run never leaves a PREFIX.bin / PREFIX.idx pair that looks complete. Use it as a context
    manager (or call :meth:`abort`) so that an exception removes the partial files.
    """

    def __init__(self, prefix: str, vocab_size: int, dtype: Optional[Any] = None, hash_bin: bool = True):
        self.prefix = normalize_prefix(str(prefix))
        self.vocab_size = int(vocab_size)
        self.dtype = np.dtype(dtype) if dtype is not None else best_dtype(self.vocab_size)
        if self.dtype not in CODE_OF_DTYPE or self.dtype.kind not in "iu":
            raise ValueError(f"dtype {self.dtype} is not an integral dtype of the format")
        if self.dtype == np.uint16 and self.vocab_size >= UINT16_VOCAB_LIMIT:
            raise ValueError(f"uint16 tokens need a vocabulary below {UINT16_VOCAB_LIMIT}, got {self.vocab_size}")
        if self.vocab_size - 1 > np.iinfo(self.dtype).max:
            raise ValueError(f"vocab_size={self.vocab_size} does not fit {self.dtype.name}")
        ensure_parent_dir(self.prefix)
        self._suffix = f".partial-{os.getpid()}"
        self._bin_tmp = self.prefix + ".bin" + self._suffix
        self._bin = open(self._bin_tmp, "wb")
        self._bin_hash = hashlib.sha256() if hash_bin else None
        self._lengths: list[np.ndarray] = []
        self._pending: list[int] = []
        self._doc_indices: list[int] = [0]
        self._num_sequences = 0
        self._sources: list[Any] = []
        self._tokenizer_sha: Optional[str] = None
        self._eod_id: Optional[int] = None
        self._closed = False

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._closed:
            self.abort()

    def add_sequence(self, tokens: Any) -> None:
        """Append one sequence; ids must be in [0, vocab_size)."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"a sequence must be 1-D, got shape {arr.shape}")
        if arr.size:
            if arr.dtype.kind not in "iu":
                raise ValueError(f"token ids must be integers, got {arr.dtype}")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token id {lo if lo < 0 else hi} outside the vocabulary [0, {self.vocab_size})")
        data = arr.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        self._bin.write(data)
        if self._bin_hash is not None:
            self._bin_hash.update(data)
        self._pending.append(arr.size)
        self._num_sequences += 1
        if len(self._pending) >= 65536:
            self._flush_lengths()

    def add_sequences(self, flat: np.ndarray, lengths: np.ndarray, document_ends: bool = True) -> None:
        """Append many sequences at once (``flat`` = their concatenation); each one ends a document if asked."""
        flat = np.asarray(flat)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != flat.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {flat.size} tokens were given")
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= self.vocab_size):
            raise ValueError(f"token ids outside the vocabulary [0, {self.vocab_size})")
        data = flat.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        self._bin.write(data)
        if self._bin_hash is not None:
            self._bin_hash.update(data)
        self._flush_lengths()
        self._lengths.append(lengths.astype(np.int32))
        first = self._num_sequences
        self._num_sequences += lengths.size
        if document_ends:
            self._doc_indices.extend(range(first + 1, self._num_sequences + 1))

    def end_document(self) -> None:
        """Close the current document: the sequences added since the previous call belong to it."""
        self._doc_indices.append(self._num_sequences)

    def add_document(self, tokens: Any) -> None:
        """One sequence that is a whole document (the usual case)."""
        self.add_sequence(tokens)
        self.end_document()

    def add_dataset(self, prefix: str) -> None:
        """Append every sequence and document of another dataset (same dtype), e.g. a preprocessing shard."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise DataFormatError(f"{other.idx_path}: dtype code: {other.dtype.name} but the output is "
                                  f"{self.dtype.name}; shards must be tokenized with the same tokenizer")
        side = other.sidecar or {}
        self._check_compatible(other.sidecar_path, side)
        if self._doc_indices[-1] != self._num_sequences:
            self.end_document()  # a merge never joins the last open document with the next dataset's first
        self._flush_lengths()
        self._lengths.append(np.array(other.sequence_lengths, dtype=np.int32))
        offset = self._num_sequences
        self._doc_indices.extend((np.asarray(other.document_indices[1:]) + offset).tolist())
        self._num_sequences += other.num_sequences
        # A shard without a sidecar says nothing of its vocabulary: its tokens are checked as they are copied.
        self._copy_bin(other.bin_path, check_vocab=side.get("vocab_size") is None)
        self._sources.extend(side.get("sources") or [os.path.basename(other.prefix)])
        del other

    def _check_compatible(self, path: str, side: dict) -> None:
        if side.get("vocab_size") is not None and int(side["vocab_size"]) != self.vocab_size:
            raise DataFormatError(f"{path}: vocab_size: {side['vocab_size']} but the output is built for "
                                  f"{self.vocab_size}; shards must come from the same tokenizer")
        sha = side.get("tokenizer_sha256")
        if sha and self._tokenizer_sha and sha != self._tokenizer_sha:
            raise DataFormatError(f"{path}: tokenizer_sha256: {sha[:12]}... differs from the other inputs' "
                                  f"{self._tokenizer_sha[:12]}...; shards must come from the same tokenizer")
        self._tokenizer_sha = self._tokenizer_sha or sha
        if side.get("eod_id") is not None:
            self._eod_id = int(side["eod_id"])

    def _copy_bin(self, path: str, check_vocab: bool = False) -> None:
        with open(path, "rb") as src:
            for block in iter(lambda: src.read(1 << 24), b""):
                if check_vocab and self.dtype.kind in "iu" and len(block) >= self.dtype.itemsize:
                    tokens = np.frombuffer(block, dtype=self.dtype, count=len(block) // self.dtype.itemsize)
                    lo, hi = int(tokens.min()), int(tokens.max())
                    if lo < 0 or hi >= self.vocab_size:
                        raise DataFormatError(f"{path}: token id {hi if hi >= self.vocab_size else lo} is outside "
                                              f"the vocabulary [0, {self.vocab_size}) of the other inputs, and this "
                                              f"shard has no sidecar saying which tokenizer made it; merge only "
                                              f"shards of one tokenizer")
                self._bin.write(block)
                if self._bin_hash is not None:
                    self._bin_hash.update(block)

    def _flush_lengths(self) -> None:
        if self._pending:
            self._lengths.append(np.asarray(self._pending, dtype=np.int32))
            self._pending = []

    def finalize(self, tokenizer_sha256: Optional[str] = None, eod_id: Optional[int] = None,
                 sources: Optional[Iterable[Any]] = None, tool: Optional[str] = None, **extra: Any) -> dict:
        """Write the index and sidecar, then rename everything into place (.idx last). Returns the sidecar."""
        if self._closed:
            raise RuntimeError("finalize() called twice")
        if self._doc_indices[-1] != self._num_sequences:
            self.end_document()
        self._flush_lengths()
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.empty(0, np.int32)
        idx_tmp = self.prefix + ".idx" + self._suffix
        idx_sha = write_index(idx_tmp, self.dtype, lengths, np.asarray(self._doc_indices, dtype=np.int64))
        sidecar = {
            "format": SIDECAR_FORMAT, "format_version": SIDECAR_VERSION, "tool": tool or TOOL_VERSION,
            "tokenizer_sha256": tokenizer_sha256 or self._tokenizer_sha, "vocab_size": self.vocab_size,
            "eod_id": eod_id if eod_id is not None else self._eod_id, "dtype": self.dtype.name,
            "num_tokens": int(lengths.sum(dtype=np.int64)), "num_sequences": int(lengths.size),
            "num_documents": len(self._doc_indices) - 1,
            "sources": list(sources) if sources is not None else self._sources,
            "idx_sha256": idx_sha, "bin_sha256": self._bin_hash.hexdigest() if self._bin_hash else None,
        }
        sidecar.update(extra)
        bin_path, idx_path, json_path = data_file_paths(self.prefix)
        # The .idx is the commit marker: remove an old one first so that a crash between the renames
        # leaves no .idx next to a mismatched .bin.
        if os.path.exists(idx_path):
            os.remove(idx_path)
        write_json_atomic(json_path, sidecar)
        os.replace(self._bin_tmp, bin_path)
        os.replace(idx_tmp, idx_path)
        self._closed = True
        return sidecar

    def abort(self) -> None:
        """Drop the partial files (called on any exception inside ``with``)."""
        if not self._bin.closed:
            self._bin.close()
        for path in (self._bin_tmp, self.prefix + ".idx" + self._suffix):
            if os.path.exists(path):
                os.remove(path)
        self._closed = True


def write_index(path: str, dtype: Any, lengths: np.ndarray, document_indices: np.ndarray) -> str:
    """Write a .idx file for these sequence lengths and document indices; returns its sha256."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype="<i4")
    document_indices = np.asarray(document_indices, dtype="<i8")
    pointers = np.zeros(lengths.size, dtype="<i8")
    if lengths.size > 1:
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= dtype.itemsize
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for part in (MAGIC, struct.pack("<Q", VERSION), struct.pack("<B", CODE_OF_DTYPE[dtype]),
                     struct.pack("<Q", lengths.size), struct.pack("<Q", document_indices.size),
                     lengths.tobytes(), pointers.tobytes(), document_indices.tobytes()):
            f.write(part)
            h.update(part)
    return h.hexdigest()


def ensure_parent_dir(prefix: str) -> None:
    """Create the folder an output prefix lives in; a path through a regular file is a ValueError."""
    parent = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise ValueError(f"output {prefix}: cannot create the folder {parent} ({e.strerror}: part of that path "
                         f"is a file); choose another output prefix") from None


def merge_datasets(prefixes: list[str], output_prefix: str, tool: Optional[str] = None) -> dict:
    """Concatenate datasets in the given order into OUTPUT (byte-identical to building it at once)."""
    if not prefixes:
        raise ValueError("no input datasets to merge")
    first = IndexedDataset(prefixes[0])
    side = first.sidecar or {}
    vocab = side.get("vocab_size") or (UINT16_VOCAB_LIMIT - 1 if first.dtype == np.uint16
                                        else int(np.iinfo(first.dtype).max) + 1)
    dtype = first.dtype
    del first
    extra = {k: side[k] for k in ("tokenizer_sha256", "eod_id") if side.get(k) is not None}
    if not side.get("vocab_size"):
        extra["vocab_size"] = None  # unknown: the builder's bound above is the dtype's, not a vocabulary
    with IndexedDatasetBuilder(output_prefix, vocab_size=int(vocab), dtype=dtype) as builder:
        for p in prefixes:
            builder.add_dataset(normalize_prefix(p))
        return builder.finalize(tool=tool, **extra)
