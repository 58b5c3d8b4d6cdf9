"""From ``cfg.data`` to the micro-batches each data-parallel rank trains on.

:func:`build_datasets` opens and checks every dataset before any training (files, format, sidecar against
the tokenizer and vocabulary, split sizes, blend weights), then builds the train/valid/test samples.
:class:`MicroBatchSampler` cuts one global sample stream into per-rank micro-batches: optimizer step s
consumes global samples [s*G, (s+1)*G), and micro-step m of rank r takes samples
s*G + m*(mb*dp) + r*mb + [0, mb). The stream does not depend on the DP size or the gradient accumulation,
so a run resumed with another DP size at ``consumed_samples`` continues exactly where it stopped.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import queue
import threading
import weakref
from fractions import Fraction
from typing import Any, Iterator, Optional

import numpy as np

from megatrain.data.blend import BlendedDataset, blend_counts, blend_description, parse_blend
from megatrain.data.gpt_dataset import SPLIT_NAMES, GPTDataset, dataset_identity, parse_split, split_ranges
from megatrain.data.indexed import DataFormatError, IndexedDataset, read_sidecar
from megatrain.files import sha256_file

logger = logging.getLogger(__name__)

DEMO_CACHE_DIR = os.path.join("~", ".cache", "megatrain", "demo")
# The loss's ignore index (megatrain.parallel.cross_entropy.IGNORE_INDEX; data/ does not import the model side)
IGNORE_INDEX = -100


def resolve_data_path(data_cfg) -> str:
    """``data.path``, or the built-in demo corpus (built on first use) when it is None."""
    if data_cfg.path is not None:
        return data_cfg.path
    from megatrain.data.demo import prepare_demo

    prefix, _ = prepare_demo(demo_cache_dir(data_cfg))
    return prefix


def demo_cache_dir(data_cfg) -> str:
    return os.path.expanduser(os.path.join(data_cfg.cache_dir, "demo") if data_cfg.cache_dir else DEMO_CACHE_DIR)


def open_dataset(prefix: str, *, verify: str, vocab_size: int, tokenizer_sha256: Optional[str]) -> IndexedDataset:
    """Open one dataset and check it against the model's vocabulary and the tokenizer (via its sidecar)."""
    ds = IndexedDataset(prefix, verify="sizes", vocab_size=None)
    side = ds.sidecar
    if side is None:
        logger.warning("%s has no sidecar (%s): its tokenizer cannot be checked", ds.idx_path, ds.sidecar_path)
    else:
        side_vocab = side.get("vocab_size")
        if side_vocab is not None and int(side_vocab) > vocab_size:
            raise DataFormatError(f"{ds.sidecar_path}: vocab_size: the dataset was tokenized with a vocabulary of "
                                  f"{side_vocab}, larger than model.vocab_size={vocab_size}; use the matching "
                                  f"model/tokenizer or re-run preprocessing")
        if side_vocab is not None and int(side_vocab) < vocab_size:
            logger.info("%s: tokenizer vocabulary %s padded to model.vocab_size=%d", prefix, side_vocab, vocab_size)
        side_sha = side.get("tokenizer_sha256")
        if tokenizer_sha256 and side_sha and side_sha != tokenizer_sha256:
            raise DataFormatError(f"{ds.sidecar_path}: tokenizer_sha256: the dataset was tokenized with "
                                  f"{side_sha[:16]}..., but data.tokenizer is {tokenizer_sha256[:16]}...; point "
                                  f"data.tokenizer at the model used for preprocessing, or re-run preprocessing")
    ds.check_vocab_size(vocab_size)
    ds.vocab_size = vocab_size
    if verify == "full":
        ds.verify_tokens(vocab_size)
    if ds.num_tokens == 0:
        raise DataFormatError(f"{ds.idx_path}: sequence lengths: the dataset holds no tokens "
                              f"({ds.num_documents} documents); check the preprocessing input")
    return ds


def _default_cache_dir(prefix: str) -> str:
    here = os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")
    parent = os.path.dirname(here)
    if os.access(parent, os.W_OK) or os.path.isdir(here) and os.access(here, os.W_OK):
        return here
    fallback = os.path.expanduser(os.path.join("~", ".cache", "megatrain", "index-cache"))
    logger.warning("%s is not writable; caching sample indices in %s (set data.cache_dir)", parent, fallback)
    return fallback


def build_datasets(data_cfg, *, seq_len: int, num_samples: dict[str, int], seed: int, vocab_size: int,
                   tokenizer_sha256: Optional[str]) -> dict[str, Any]:
    """Datasets "train" / "valid" / "test" (a split of weight 0 is absent); ``ds[i]`` is int64[seq_len + 1].

    ``num_samples[name]`` is how many samples the run will read from that split (None or missing: one
    epoch). A valid/test split too small for one sample is left out with a warning unless samples of it
    were asked for; a train split that small is an error.
    """
    from megatrain.config import ConfigError

    if seq_len <= 0:
        raise ConfigError(f"train.seq_len={seq_len} must be positive")
    pairs = parse_blend(resolve_data_path(data_cfg))
    split_weights = parse_split(data_cfg.split)
    opened = [(Fraction(w), open_dataset(p, verify=data_cfg.verify, vocab_size=vocab_size,
                                         tokenizer_sha256=tokenizer_sha256)) for w, p in pairs]
    opened = [(w, ds) for w, ds in opened if w > 0]
    out: dict[str, Any] = {}
    for k, name in enumerate(SPLIT_NAMES):
        if split_weights[k] == 0:
            continue
        requested = num_samples.get(name) or None
        try:
            out[name] = _build_split(opened, k, name, split_weights, seq_len, requested, seed, data_cfg.cache_dir)
        except DataFormatError as e:
            if name == "train" or requested:
                raise
            logger.warning("no %s split: %s", name, e)
    return out


def _build_split(opened: list, k: int, name: str, split_weights: list[float], seq_len: int,
                 requested: Optional[int], seed: int, cache_dir: Optional[str]):
    def component(ds: IndexedDataset, n: Optional[int]) -> GPTDataset:
        rng = split_ranges(ds.num_documents, split_weights)[k]
        return GPTDataset(ds, rng, seq_len=seq_len, num_samples=n, seed=seed,
                          cache_dir=cache_dir or _default_cache_dir(ds.prefix), name=name)

    if len(opened) == 1:
        return component(opened[0][1], requested)
    weights = [w for w, _ in opened]
    if requested is None:
        # one pass: as many samples as the blend can draw before its first dataset repeats
        one_epoch = [len(component(ds, None)) for _, ds in opened]
        total = sum(weights)
        requested = int(min(n * total / w for (w, _), n in zip(opened, one_epoch)))
    counts = blend_counts(weights, requested)
    parts = [component(ds, max(c, 1)) for (_, ds), c in zip(opened, counts)]
    key, desc = blend_description([dataset_identity(ds) for _, ds in opened], weights, requested,
                                  {"split": name, "seq_len": seq_len, "seed": seed})
    first = opened[0][1].prefix
    cdir = cache_dir or _default_cache_dir(first)
    return BlendedDataset(parts, weights, requested, cache=(cdir, f"blend-{name}-{key}", desc))


def data_fingerprint(data_cfg) -> str:
    """Stable hash of what the data is: dataset contents (sidecar hashes), blend weights and split.

    Paths are not part of it: moving a dataset keeps its fingerprint; re-tokenizing it changes it.
    """
    pairs = parse_blend(resolve_data_path(data_cfg))
    total = sum(Fraction(w) for w, _ in pairs)
    items = []
    for w, prefix in pairs:
        side = read_sidecar(prefix) or {}
        ident = {k: side[k] for k in ("idx_sha256", "bin_sha256", "tokenizer_sha256") if side.get(k)}
        if "idx_sha256" not in ident:
            idx = prefix + ".idx"
            if not os.path.isfile(idx):
                raise DataFormatError(f"{idx}: no such file (dataset prefix {prefix!r}); check data.path")
            ident["idx_sha256"] = sha256_file(idx)
        items.append({"weight": str(Fraction(w) / total), "dataset": ident})
    blob = {"datasets": items, "split": [round(x, 12) for x in parse_split(data_cfg.split)]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- micro-batches


def micro_batch_indices(*, micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int,
                        consumed_samples: int) -> Iterator[range]:
    """Global sample ids of this rank's micro-batches, in order, forever."""
    mb, g = micro_batch_size, global_batch_size
    step = 0
    while True:
        base = consumed_samples + step * g
        for m in range(g // (mb * dp_size)):
            start = base + m * mb * dp_size + dp_rank * mb
            yield range(start, start + mb)
        step += 1


def check_batch_arguments(micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int,
                          consumed_samples: int) -> None:
    from megatrain.config import ConfigError

    if micro_batch_size <= 0 or dp_size <= 0:
        raise ConfigError(f"train.micro_batch_size={micro_batch_size} and the data-parallel size {dp_size} "
                          f"must be positive")
    if global_batch_size <= 0 or global_batch_size % (micro_batch_size * dp_size):
        raise ConfigError(f"train.global_batch_size={global_batch_size} must be a positive multiple of "
                          f"train.micro_batch_size x data-parallel size = {micro_batch_size} x {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} outside [0, {dp_size})")
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples={consumed_samples} must be >= 0")


def _collate(samples: list) -> tuple:
    import torch

    batch = torch.from_numpy(np.stack(samples))  # (mb, seq_len + 1) int64
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # (mb, seq_len) each


def document_positions(starts: np.ndarray, seq_len: int) -> np.ndarray:
    """int64[seq_len]: each input token's position in its document, from the offsets where documents
    begin (:meth:`GPTDataset.document_starts`). The sample's first token is position 0 even mid-document:
    the sample cannot see what came before it, and positions stay below seq_len (the RoPE tables).
    One sample at a time: the definition the loader's vectorized collate is tested against."""
    bounds = np.concatenate([[0], starts[starts < seq_len], [seq_len]]).astype(np.int64)
    return np.arange(seq_len, dtype=np.int64) - np.repeat(bounds[:-1], np.diff(bounds))


def _collate_documents(samples: list, positions: bool, mask_loss: bool) -> tuple:
    """(tokens, labels[, position_ids]) from (tokens, document starts) pairs; position_ids (mb, seq_len).
    Numpy throughout, vectorized over the micro-batch."""
    import torch

    batch = np.stack([s for s, _ in samples])  # (mb, seq_len + 1) int64
    seq_len = batch.shape[1] - 1
    labels = batch[:, 1:].copy()
    if mask_loss:
        for row, (_, starts) in enumerate(samples):
            # label t is token t + 1: a document's first token, predicted from the previous document
            labels[row, starts - 1] = IGNORE_INDEX
    out = (torch.from_numpy(np.ascontiguousarray(batch[:, :-1])), torch.from_numpy(labels))
    if not positions:
        return out
    # every document's start in the flattened (mb * seq_len) batch, each row's start included, in order
    mb = len(samples)
    begins = np.concatenate([row * seq_len + np.concatenate([[0], st[st < seq_len]])
                             for row, (_, st) in enumerate(samples)] + [[mb * seq_len]]).astype(np.int64)
    pos = np.arange(mb * seq_len, dtype=np.int64) - np.repeat(begins[:-1], np.diff(begins))
    return (*out, torch.from_numpy(pos.reshape(mb, seq_len)))


def document_options(data_cfg) -> dict:
    """The loader's document keywords from ``cfg.data`` (see :class:`MicroBatchSampler`)."""
    return {"document_layout": bool(data_cfg.document_mask), "eod_mask_loss": bool(data_cfg.eod_mask_loss)}


class _Wrapped:
    """dataset[i] for any global sample id: past the end, the stream starts over (with a warning)."""

    def __init__(self, dataset):
        self.dataset, self.n, self.warned = dataset, len(dataset), False

    def _wrap(self, i: int) -> int:
        if not self.warned:
            logger.warning("sample %d is past the %d samples built for this split; starting over "
                           "(ask build_datasets for more samples)", i, self.n)
            self.warned = True
        return i % self.n

    def __getitem__(self, i: int):
        if i >= self.n:
            i = self._wrap(i)
        return self.dataset[i]

    def document_starts(self, i: int) -> np.ndarray:
        if i >= self.n:
            i = self._wrap(i)
        return self.dataset.document_starts(i)

    def __len__(self) -> int:
        return self.n


class _WithStarts:
    """(tokens, document starts) per sample, for the document-aware collate."""

    def __init__(self, wrapped: _Wrapped):
        if not hasattr(wrapped.dataset, "document_starts"):
            raise TypeError(f"{type(wrapped.dataset).__name__} has no document_starts(): data.document_mask and "
                            f"data.eod_mask_loss need a GPTDataset or BlendedDataset")
        self.wrapped = wrapped

    def __getitem__(self, i: int) -> tuple:
        return self.wrapped[i], self.wrapped.document_starts(i)

    def __len__(self) -> int:
        return len(self.wrapped)


_END = object()  # put by the prefetch thread after the last micro-batch of a bounded sampler


def _produce(indices: Iterator[range], dataset, out: queue.Queue, stop: threading.Event, pin: bool,
             collate=_collate) -> None:
    """Prefetch thread: assemble micro-batches ahead of the consumer until ``stop`` is set or the
    indices run out (then ``_END``)."""
    try:
        for ids in indices:
            batch = collate([dataset[i] for i in ids])
            if pin:
                batch = tuple(t.pin_memory() for t in batch)
            while not stop.is_set():
                try:
                    out.put(batch, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        out.put(_END)
    except BaseException as e:  # handed to the consumer, raised there
        out.put(e)


def _stop_prefetch(stop: threading.Event, thread: Optional[threading.Thread]) -> None:
    stop.set()
    if thread is not None and thread.is_alive() and thread is not threading.current_thread():
        thread.join(timeout=5)


class MicroBatchSampler:
    """Iterator over (tokens, labels) torch.LongTensor (micro_batch, seq_len) for one DP rank, forever.

    With ``document_layout`` each item is (tokens, labels, position_ids): position_ids (micro_batch,
    seq_len) int64 is every token's position in its document (0 where a document begins), the layout
    that document-masked attention and per-document RoPE read. With ``eod_mask_loss`` the label of
    every document's first token (predicted from the document before it) is ``IGNORE_INDEX``. Both
    come from the sample index (``document_starts``); with neither, batches are exactly as before.

    Batches are assembled ahead of time: by a background thread (``num_workers=0``) or by a torch
    DataLoader with worker processes. Memory is pinned when CUDA is available.

    ``context=(rank, size)``: context parallelism; every rank of a context group reads the same samples
    (they share a DP rank) and keeps its contiguous 1/size of each sequence, (micro_batch, seq_len/size).
    Labels are shifted before the slice, so the label of a slice's last token is the next slice's first.
    ``num_micro_batches`` bounds the stream (then StopIteration): the prefetch then never reads
    samples the caller will not use, so a split built for exactly that many is never read past.
    """

    def __init__(self, dataset, *, micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, prefetch: int = 4, num_workers: int = 0,
                 pin_memory: Optional[bool] = None, context: tuple[int, int] = (0, 1),
                 document_layout: bool = False, eod_mask_loss: bool = False,
                 num_micro_batches: Optional[int] = None):
        check_batch_arguments(micro_batch_size, global_batch_size, dp_rank, dp_size, consumed_samples)
        import torch

        self.context = context
        self.dataset = _Wrapped(dataset)
        self._collate = _collate
        if document_layout or eod_mask_loss:
            self.dataset = _WithStarts(self.dataset)
            self._collate = functools.partial(_collate_documents, positions=document_layout, mask_loss=eod_mask_loss)
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size, self.consumed_samples = dp_rank, dp_size, consumed_samples
        self.num_micro_steps = global_batch_size // (micro_batch_size * dp_size)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._indices = micro_batch_indices(micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                                            dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed_samples)
        if num_micro_batches is not None:
            self._indices = itertools.islice(self._indices, max(0, num_micro_batches))
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        if num_workers > 0:
            self._iter = self._loader_iter(num_workers, prefetch)
            self._thread = None
        else:
            self._iter = None
            # The thread gets no reference to self: when the caller drops the sampler (e.g. after an
            # evaluation), the finalizer stops the thread instead of the thread keeping the sampler alive.
            self._thread = threading.Thread(target=_produce, name="megatrain-prefetch", daemon=True,
                                            args=(self._indices, self.dataset, self._queue, self._stop,
                                                  self.pin_memory, self._collate))
            self._thread.start()
        # Runs when the sampler is dropped, on close(), and at interpreter exit (finalizers run before daemon
        # threads are killed): a prefetch thread caught mid-batch at shutdown can abort the interpreter.
        self._finalizer = weakref.finalize(self, _stop_prefetch, self._stop, self._thread)

    def _loader_iter(self, num_workers: int, prefetch: int) -> Iterator[tuple]:
        import torch.utils.data as tud

        loader = tud.DataLoader(self.dataset, batch_sampler=(list(r) for r in self._indices), collate_fn=self._collate,
                                num_workers=num_workers, pin_memory=self.pin_memory,
                                prefetch_factor=max(1, prefetch // num_workers), persistent_workers=False)
        return iter(loader)

    def __iter__(self) -> "MicroBatchSampler":
        return self

    def __next__(self) -> tuple:
        item = self._next_whole()
        if self.context[1] == 1:
            return item
        from megatrain.parallel.context import context_slice

        rank, size = self.context
        tokens, labels, *layout = item
        # position_ids stay whole: attention after the all-to-all sees every token (model/documents.py)
        return (context_slice(tokens, rank, size), context_slice(labels, rank, size), *layout)

    def _next_whole(self) -> tuple:
        if self._iter is not None:
            return next(self._iter)
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the data prefetch thread stopped without an error") from None
        if item is _END:
            self._queue.put(_END)  # every later call ends too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._finalizer()
        self._iter = None


def build_micro_batches(dataset, *, micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int,
                        consumed_samples: int, num_workers: int = 0, prefetch: int = 4,
                        context: tuple[int, int] = (0, 1), document_layout: bool = False,
                        eod_mask_loss: bool = False, num_micro_batches: Optional[int] = None) -> MicroBatchSampler:
    """This DP rank's (tokens, labels[, position_ids]) micro-batches, in order, forever or for
    ``num_micro_batches`` (see :class:`MicroBatchSampler`)."""
    return MicroBatchSampler(dataset, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                             dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed_samples,
                             num_workers=num_workers, prefetch=prefetch, context=context,
                             document_layout=document_layout, eod_mask_loss=eod_mask_loss,
                             num_micro_batches=num_micro_batches)
