"""GPT samples over an indexed dataset (Megatron's GPTDataset semantics).

A sample is a window of ``seq_len + 1`` tokens of the split's token stream (its sequences, shuffled, epoch
after epoch); windows run across document boundaries and consecutive samples share one token (the last
label of sample i is the first input of sample i + 1), so one epoch puts every token in exactly one
sample's inputs, or in the last label of the final sample, except for a tail shorter than a sample.

Three arrays describe the samples, built with numpy only (cumsum + searchsorted, no loop per sample or
per document) and cached as .npy files keyed by a hash of everything they depend on:

- document index: the split's sequence ids, shuffled per epoch, repeated for as many epochs as needed;
- sample index [num_samples + 1, 2]: (position in the document index, token offset) where each sample
  starts; sample i ends where sample i + 1 starts (that token included);
- shuffle index: a permutation of the samples.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from typing import Any, Iterator, Optional

import numpy as np

from megatrain.data.indexed import DataFormatError, IndexedDataset
from megatrain.files import atomic_path

logger = logging.getLogger(__name__)

INDEX_VERSION = 2
# Megatron's rule: when the last epoch contributes fewer than 80% of an epoch's samples, it is shuffled
# apart from the others, so that its samples are not spread thinly over the whole run.
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80
SPLIT_NAMES = ("train", "valid", "test")
_NO_STARTS = np.zeros(0, dtype=np.int64)


def parse_split(split: str, field: str = "data.split") -> list[float]:
    """'969,30,1' -> normalized weights for train/valid/test (missing entries are 0)."""
    from megatrain.config import ConfigError

    parts = [p.strip() for p in str(split).replace("/", ",").split(",") if p.strip()]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{field}={split!r}: expected up to three comma-separated numbers like 969,30,1") from None
    if not 1 <= len(weights) <= 3 or any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"{field}={split!r}: need 1 to 3 non-negative weights with a positive sum, like 969,30,1")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_ranges(num_documents: int, weights: list[float]) -> list[tuple[int, int]]:
    """Document ranges [start, end) of each split; Megatron's rounding (cumulative, last one absorbs drift)."""
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * float(num_documents))))
    drift = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - drift for b in bounds[1:]]
    bounds = [min(max(b, 0), num_documents) for b in bounds]
    return [(bounds[i], bounds[i + 1]) for i in range(len(weights))]


# --------------------------------------------------------------------------- index building


def num_epochs_for(tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    """Fewest epochs whose token stream yields ``num_samples`` windows of seq_len + 1 tokens."""
    # (e * T - 1) // S >= n  <=>  e * T >= n * S + 1
    return max(1, -(-(num_samples * seq_len + 1) // tokens_per_epoch))


def build_document_index(sequence_ids: np.ndarray, num_epochs: int, rng: np.random.Generator,
                         separate_final_epoch: bool) -> np.ndarray:
    dtype = np.int32 if sequence_ids.size == 0 or sequence_ids.max() < 2**31 - 1 else np.int64
    base = sequence_ids.astype(dtype)
    full = num_epochs - 1 if separate_final_epoch else num_epochs
    head = np.tile(base, full)
    rng.shuffle(head)
    if not separate_final_epoch:
        return head
    tail = base.copy()
    rng.shuffle(tail)
    return np.concatenate([head, tail])


def build_sample_index(lengths_in_order: np.ndarray, seq_len: int, num_samples: int) -> np.ndarray:
    """[num_samples + 1, 2]: document-index position and offset where sample i starts (token i * seq_len).

    ``searchsorted(..., side="right") - 1`` lands on the last document starting at or before a position,
    which skips empty documents (they share their start with the next one).
    """
    cum = np.empty(lengths_in_order.size + 1, dtype=np.int64)
    cum[0] = 0
    np.cumsum(lengths_in_order, dtype=np.int64, out=cum[1:])
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    if starts[-1] >= cum[-1]:
        raise ValueError(f"{num_samples} samples of {seq_len}+1 tokens need more than the {int(cum[-1])} "
                         f"tokens of the document index")
    pos = np.searchsorted(cum, starts, side="right") - 1
    out = np.empty((num_samples + 1, 2), dtype=np.int64)
    out[:, 0] = pos
    out[:, 1] = starts - cum[pos]
    return out


def build_shuffle_index(num_samples: int, total: int, rng: np.random.Generator) -> np.ndarray:
    """Permutation of [0, total): the first ``num_samples`` and the rest are shuffled separately."""
    dtype = np.uint32 if total < 2**32 - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total:
        return first
    rest = np.arange(num_samples, total, dtype=dtype)
    rng.shuffle(rest)
    return np.concatenate([first, rest])


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes of one machine (fcntl); a no-op where unsupported.

    Ranks on other machines may still build concurrently; every file is written under a temporary name
    and renamed, and all builders produce identical bytes, so that race is harmless, only wasteful.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux/macOS
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:  # some network filesystems refuse flock
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def save_npy_atomic(path: str, array: np.ndarray) -> None:
    with atomic_path(path, fsync=False) as tmp, open(tmp, "wb") as f:  # a cache: rebuilt if lost
        np.save(f, array, allow_pickle=False)


def cached_arrays(cache_dir: str, stem: str, description: dict, names: tuple[str, ...], build) -> dict:
    """Load ``names`` from ``cache_dir/stem-NAME.npy`` or build them (once: under a lock, temp + rename)."""
    paths = {n: os.path.join(cache_dir, f"{stem}-{n}.npy") for n in names}
    done = os.path.join(cache_dir, f"{stem}-description.json")

    def load() -> Optional[dict]:
        if not os.path.exists(done):
            return None
        try:
            return {n: np.load(p, mmap_mode="r", allow_pickle=False) for n, p in paths.items()}
        except (OSError, ValueError):
            return None

    arrays = load()
    if arrays is not None:
        return arrays
    os.makedirs(cache_dir, exist_ok=True)
    with file_lock(os.path.join(cache_dir, f"{stem}.lock")):
        arrays = load()
        if arrays is not None:
            return arrays
        logger.info("building sample indices %s in %s", stem, cache_dir)
        built = build()
        for n in names:
            save_npy_atomic(paths[n], built[n])
        tmp = f"{done}.partial-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(description, f, indent=2, sort_keys=True)
        os.replace(tmp, done)  # written last: its presence means the arrays are complete
    return load() or built


def dataset_identity(indexed: IndexedDataset) -> dict:
    """What identifies the dataset's content, cheaply: the sidecar's hash, else index size and mtime."""
    side = indexed.sidecar or {}
    if side.get("idx_sha256"):
        return {"idx_sha256": side["idx_sha256"]}
    st = os.stat(indexed.idx_path)
    return {"idx_path": os.path.abspath(indexed.idx_path), "idx_size": st.st_size, "idx_mtime_ns": st.st_mtime_ns,
            "bin_size": os.path.getsize(indexed.bin_path)}


# --------------------------------------------------------------------------- dataset


class GPTDataset:
    """Samples of ``seq_len + 1`` tokens (int64) from documents [start, end) of an indexed dataset.

    ``len(ds)`` is the number of samples built (all samples of the epochs needed for ``num_samples``;
    one epoch when ``num_samples`` is None).
    """

    def __init__(self, indexed: IndexedDataset, document_range: tuple[int, int], *, seq_len: int,
                 num_samples: Optional[int], seed: int, cache_dir: Optional[str] = None, name: str = "train"):
        self.indexed, self.seq_len, self.seed, self.name = indexed, int(seq_len), int(seed), name
        start, end = document_range
        docs = indexed.document_indices
        self.sequence_range = (int(docs[start]), int(docs[end]))
        lengths = np.asarray(indexed.sequence_lengths[self.sequence_range[0]:self.sequence_range[1]])
        self.tokens_per_epoch = int(lengths.sum(dtype=np.int64))
        if self.tokens_per_epoch < self.seq_len + 1:
            what = "is empty" if self.tokens_per_epoch == 0 else f"has only {self.tokens_per_epoch} tokens"
            raise DataFormatError(f"{indexed.prefix}: the {name} split (documents {start}..{end}) {what}, fewer "
                                  f"than one sample of train.seq_len + 1 = {self.seq_len + 1} tokens; lower "
                                  f"train.seq_len, give the split more weight in data.split, or add data")
        per_epoch = (self.tokens_per_epoch - 1) // self.seq_len
        self.num_samples_requested = per_epoch if num_samples is None else int(num_samples)
        self.num_epochs = num_epochs_for(self.tokens_per_epoch, self.seq_len, self.num_samples_requested)
        desc = {"class": "GPTDataset", "version": INDEX_VERSION, "dataset": dataset_identity(indexed),
                "document_range": [int(start), int(end)], "seq_len": self.seq_len, "seed": self.seed,
                "num_samples": self.num_samples_requested, "split": name,
                "separate_final_epoch_threshold": SEPARATE_FINAL_EPOCH_THRESHOLD}
        key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20]
        cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(indexed.prefix)), "index-cache")
        stem = f"{os.path.basename(indexed.prefix)}-{name}-{key}"
        arrays = cached_arrays(cache_dir, stem, desc, ("document_index", "sample_index", "shuffle_index"),
                               lambda: self._build(lengths))
        self.document_index = np.asarray(arrays["document_index"])
        self.sample_index = np.asarray(arrays["sample_index"])
        self.shuffle_index = np.asarray(arrays["shuffle_index"])
        self._bind_fast_paths()

    @property
    def sequence_ids(self) -> np.ndarray:
        """The split's non-empty sequences (empty ones hold no tokens, so samples never start in them)."""
        first, end = self.sequence_range
        lengths = np.asarray(self.indexed.sequence_lengths[first:end])
        return first + np.flatnonzero(lengths > 0)

    def _build(self, lengths: np.ndarray) -> dict:
        seq_len, n_req, epochs, tokens = self.seq_len, self.num_samples_requested, self.num_epochs, self.tokens_per_epoch
        separate = False
        if epochs > 1:
            before_final = ((epochs - 1) * tokens - 1) // seq_len
            per_epoch = (tokens - 1) // seq_len
            separate = (n_req - before_final) < int(SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch)
        rng = np.random.Generator(np.random.PCG64(self.seed))
        doc_index = build_document_index(self.sequence_ids, epochs, rng, separate)
        seq_lengths = np.asarray(self.indexed.sequence_lengths)
        total = (epochs * tokens - 1) // seq_len
        sample_index = build_sample_index(seq_lengths[doc_index], seq_len, total)
        first = ((epochs - 1) * tokens - 1) // seq_len if separate else total
        shuffle_index = build_shuffle_index(first, total, rng)
        return {"document_index": doc_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

    def _bind_fast_paths(self) -> None:
        # Plain ndarrays on the hot path (~10^5 calls a second); nothing per document is materialized,
        # so memory stays O(samples) however many documents the dataset has.
        self._tokens = self.indexed.tokens
        self._pointers = self.indexed.sequence_pointers
        self._seq_lengths = self.indexed.sequence_lengths
        self._shift = int(self.indexed.dtype.itemsize).bit_length() - 1  # bytes -> tokens
        vocab = getattr(self.indexed, "vocab_size", None)
        self._vocab = int(vocab) if vocab is not None else None
        self._signed = self.indexed.dtype.kind == "i"

    def __len__(self) -> int:
        return int(self.shuffle_index.size)

    def __getitem__(self, idx: int) -> np.ndarray:
        i = int(self.shuffle_index[idx])
        d0, o0, d1, o1 = self.sample_index[i:i + 2].ravel().tolist()
        if d0 == d1:
            s = (int(self._pointers[self.document_index[d0]]) >> self._shift) + o0
            out = self._tokens[s:s + (o1 - o0) + 1].astype(np.int64)
        else:
            # Crosses documents: one slice per piece (a sample spans few documents at realistic lengths).
            seqs = self.document_index[d0:d1 + 1]
            starts = (self._pointers[seqs] >> self._shift).tolist()
            lengths = self._seq_lengths[seqs].tolist()
            starts[0] += o0
            lengths[0] -= o0
            lengths[-1] = o1 + 1
            tokens = self._tokens
            out = np.concatenate([tokens[a:a + n] for a, n in zip(starts, lengths)], dtype=np.int64)
        # data.verify=sizes reads no tokens at start; an id outside the vocabulary would index past the
        # embedding (on a GPU: a device-side assert), so every sample is checked here (~3 us; docs/benchmarks.md).
        if self._vocab is not None and (out.max() >= self._vocab or (self._signed and out.min() < 0)):
            bad = out[(out >= self._vocab) | (out < 0)]
            raise DataFormatError(f"{self.indexed.bin_path}: sample {idx} of the {self.name} split holds token id "
                                  f"{int(bad[0])}, outside the vocabulary [0, {self._vocab}); the data was tokenized "
                                  f"with another vocabulary or is corrupt (megatrain-inspect-data verify "
                                  f"{self.indexed.prefix} --full --vocab-size {self._vocab} checks every token)")
        return out

    def document_starts(self, idx: int) -> np.ndarray:
        """Offsets t in (0, seq_len] of the window ``self[idx]`` where a new document begins (int64,
        increasing; empty when the sample lies inside one document).

        Read from the sample index, not from the tokens: a dataset without end-of-document tokens has
        the same layout. The documents are the index's sequences (one per document unless the data was
        split into sentences); the stream joins them in shuffled order, so neighbours are unrelated."""
        i = int(self.shuffle_index[idx])
        d0, o0, d1, _ = self.sample_index[i:i + 2].ravel().tolist()
        if d0 == d1:
            return _NO_STARTS
        if d1 == d0 + 1:  # the common case at realistic lengths: one boundary, scalar reads only
            return np.array([int(self._seq_lengths[int(self.document_index[d0])]) - o0], dtype=np.int64)
        # document d0 + j (j >= 1) starts after the rest of d0 and all of d0+1 .. d0+j-1
        return np.cumsum(self._seq_lengths[self.document_index[d0:d1]], dtype=np.int64) - o0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in ("_tokens", "_pointers", "_seq_lengths", "_shift"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._bind_fast_paths()

    def describe(self) -> dict[str, Any]:
        return {"prefix": self.indexed.prefix, "split": self.name, "samples": len(self), "epochs": self.num_epochs,
                "tokens_per_epoch": self.tokens_per_epoch, "seq_len": self.seq_len}
