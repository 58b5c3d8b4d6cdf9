"""Text (JSONL, .gz, plain text) -> tokens -> PREFIX.bin/.idx/.json. The engine behind tools/preprocess_data.py.

Worker processes parse and tokenize batches of lines; the parent writes their results in input order, so
the output does not depend on the number of workers. A partition (``partition``/``num_partitions``) is a
contiguous range of the input's records, so merging the partitions in order gives exactly the dataset that
one run over everything gives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import time
import zlib
from typing import Any, Iterator, Optional

import numpy as np

from megatrain.data.indexed import (DataFormatError, IndexedDatasetBuilder, best_dtype, check_replaceable,
                                    data_file_paths)
from megatrain.data.tokenizer import Tokenizer
from megatrain.files import check_not_inputs

logger = logging.getLogger(__name__)

BATCH_RECORDS = 4096
BATCH_BYTES = 1 << 20  # per task: large enough that inter-process hand-offs are rare
MAX_REPORTED_ERRORS = 20


@dataclasses.dataclass
class PreprocessOptions:
    inputs: list[str]
    output_prefix: str
    tokenizer_model: str
    workers: int = 1
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = False
    prepend_bos: bool = False
    partition: int = 0
    num_partitions: int = 1
    dedup: bool = False
    strict: bool = False
    text_unit: str = "line"  # plain-text files: one document per line, or the whole file as one document
    progress: bool = True


@dataclasses.dataclass
class PreprocessResult:
    outputs: list[str]
    records: int = 0
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    duplicates: int = 0
    empty: int = 0
    malformed: int = 0
    errors: list = dataclasses.field(default_factory=list)  # (file, line, reason), the first few
    seconds: float = 0.0

    def summary(self, workers: int) -> str:
        mb = self.bytes / 1e6
        rate = mb / max(self.seconds, 1e-9)
        return (f"{self.documents:,} documents ({self.duplicates:,} duplicates, {self.empty:,} empty, "
                f"{self.malformed:,} malformed skipped), {self.tokens:,} tokens from {mb:.1f} MB in "
                f"{self.seconds:.1f} s ({self.documents / max(self.seconds, 1e-9):,.0f} docs/s, {rate:.2f} MB/s, "
                f"{rate / max(workers, 1):.2f} MB/s per worker) -> {', '.join(self.outputs)}")


def _is_json(path: str) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith((".jsonl", ".json", ".ndjson"))


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


@contextlib.contextmanager
def _reading(path: str) -> Iterator[None]:
    """A damaged .gz input becomes a DataFormatError naming the file."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataFormatError(f"--input {path}: not a readable gzip file ({e}); re-download or re-compress "
                              f"it") from None


def count_records(path: str, text_unit: str = "line") -> int:
    """Number of records (lines; 1 per file in ``file`` mode) exactly as :func:`iter_records` yields them."""
    if text_unit == "file" and not _is_json(path):
        return 1
    n, last = 0, b"\n"
    with _reading(path), _open(path) as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def iter_records(path: str, text_unit: str = "line") -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of each record of one input file."""
    with _reading(path), _open(path) as f:
        if text_unit == "file" and not _is_json(path):
            yield 1, f.read()
            return
        for lineno, line in enumerate(f, 1):
            yield lineno, line


# --------------------------------------------------------------------------- worker side

_W: dict[str, Any] = {}


def _init_worker(model_path: str, json_keys: tuple[str, ...], append_eod: bool, prepend_bos: bool,
                 dedup: bool) -> None:
    tok = Tokenizer(model_path)
    _W.update(tok=tok, keys=json_keys, eod=append_eod, bos=prepend_bos, dedup=dedup)


def _parse(is_json: bool, raw: bytes) -> tuple[Optional[list[str]], Optional[str]]:
    """(texts per key, None) or (None, reason it is malformed)."""
    keys = _W["keys"]
    if not is_json:
        try:
            return [raw.decode("utf-8").rstrip("\r\n")], None
        except UnicodeDecodeError as e:  # replacing bytes with U+FFFD would train on garbage silently
            return None, f"not UTF-8 text ({e.reason} at byte {e.start})"
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return None, f"bad JSON ({e.msg} at column {e.colno})"
    except UnicodeDecodeError as e:  # json.loads decodes bytes itself
        return None, f"not UTF-8 text ({e.reason} at byte {e.start})"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    texts = []
    for k in keys:
        if k not in obj:
            return None, f"missing key {k!r}"
        if not isinstance(obj[k], str):
            return None, f"key {k!r} is {type(obj[k]).__name__}, not a string"
        texts.append(obj[k])
    return texts, None


def _encode_batch(batch: tuple[int, bool, list[tuple[int, bytes]]]) -> dict:
    """Parse + tokenize one batch of records; returns numpy arrays so that pickling back is cheap."""
    file_idx, is_json, records = batch
    tok, keys = _W["tok"], _W["keys"]
    status, errors, hashes, nbytes = [], [], [], 0
    texts_per_key: list[list[str]] = [[] for _ in keys]
    for lineno, raw in records:
        nbytes += len(raw)
        if is_json and not raw.strip():
            status.append(1)  # blank line between JSON records: empty, not malformed
            continue
        texts, reason = _parse(is_json, raw)
        if texts is None:
            status.append(2)
            errors.append((file_idx, lineno, reason))
            continue
        if not any(t.strip() for t in texts):
            status.append(1)
            continue
        status.append(0)
        for acc, t in zip(texts_per_key, texts):
            acc.append(t)
        if _W["dedup"]:
            hashes.append(hashlib.blake2b("\x00".join(texts).encode("utf-8", "surrogatepass"), digest_size=16).digest())
    out_keys = []
    for acc in texts_per_key:
        ids = tok.encode_batch(acc) if acc else []
        if _W["bos"]:
            ids = [[tok.bos_id] + x for x in ids]
        if _W["eod"]:
            ids = [x + [tok.eod_id] for x in ids]
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        out_keys.append((flat, lengths))
    return {"status": np.asarray(status, dtype=np.int8), "errors": errors, "hashes": hashes,
            "keys": out_keys, "bytes": nbytes}


# --------------------------------------------------------------------------- parent side


def _partition_range(files: list[str], opts: PreprocessOptions) -> tuple[int, int]:
    if opts.num_partitions == 1:
        return 0, -1
    total = sum(count_records(p, opts.text_unit) for p in files)
    i, k = opts.partition, opts.num_partitions
    return total * i // k, total * (i + 1) // k


def _batches(files: list[str], opts: PreprocessOptions, lo: int, hi: int) -> Iterator[tuple]:
    ordinal = 0
    for file_idx, path in enumerate(files):
        is_json = _is_json(path)
        batch: list[tuple[int, bytes]] = []
        size = 0
        for lineno, raw in iter_records(path, opts.text_unit):
            inside = hi < 0 or lo <= ordinal < hi
            ordinal += 1
            if not inside:
                if hi >= 0 and ordinal > hi:
                    break
                continue
            batch.append((lineno, raw))
            size += len(raw)
            if len(batch) >= BATCH_RECORDS or size >= BATCH_BYTES:
                yield file_idx, is_json, batch
                batch, size = [], 0
        if batch:
            yield file_idx, is_json, batch
        if hi >= 0 and ordinal >= hi:
            return


def _output_prefixes(opts: PreprocessOptions) -> list[str]:
    if len(opts.json_keys) == 1:
        return [opts.output_prefix]
    return [f"{opts.output_prefix}_{k}" for k in opts.json_keys]


def check_options(opts: PreprocessOptions) -> list[str]:
    """Validate the options; returns the expanded input files."""
    import glob

    files: list[str] = []
    for pattern in opts.inputs:
        matched = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        for path in matched:
            if os.path.isdir(path):
                matched_dir = sorted(os.path.join(path, n) for n in os.listdir(path)
                                     if n.endswith((".jsonl", ".json", ".ndjson", ".txt", ".gz")))
                files.extend(matched_dir)
            elif not os.path.isfile(path):
                raise DataFormatError(f"--input {path}: no such file")
            else:
                files.append(path)
    if not files:
        raise DataFormatError(f"--input {' '.join(opts.inputs)}: no input files found")
    if opts.num_partitions < 1 or not 0 <= opts.partition < opts.num_partitions:
        raise ValueError(f"--partition {opts.partition} --num-partitions {opts.num_partitions}: need "
                         f"0 <= partition < num_partitions")
    if opts.workers < 1:
        raise ValueError(f"--workers {opts.workers}: must be at least 1")
    if opts.text_unit not in ("line", "file"):
        raise ValueError(f"--text-unit {opts.text_unit!r}: choose line or file")
    for path in files:
        if not _is_json(path):  # a JSON line with a NUL byte is one malformed record; a text file has no records
            check_text(path)
    return files


SNIFF_BYTES = 1 << 16


def check_text(path: str) -> None:
    """Refuse a file that is not text: NUL bytes in its first 64 KiB (a binary file, UTF-16) would otherwise be
    tokenized as U+FFFD replacement characters or skipped line by line as malformed."""
    try:
        with _reading(path), _open(path) as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:  # unreadable (permissions), a FIFO that fails, ...
        raise DataFormatError(f"--input {path}: cannot be read ({e.strerror or e}); check the file's "
                              f"permissions") from None
    nul = head.find(b"\x00")
    if nul >= 0:
        raise DataFormatError(f"--input {path}: not a text file (a NUL byte at byte {nul}: binary "
                              f"data or UTF-16 text); pass UTF-8 JSONL or text files")


def check_outputs(opts: PreprocessOptions, files: list[str]) -> list[str]:
    """The output prefixes, after checking that no output is an input and nothing else gets replaced."""
    outputs = _output_prefixes(opts)
    inputs = files + [p for p in opts.inputs if os.path.isdir(p)] + [opts.tokenizer_model]
    check_not_inputs([("--output-prefix", path) for prefix in outputs for path in data_file_paths(prefix)],
                     inputs, error=DataFormatError, fix="choose another --output-prefix")
    for prefix in outputs:
        check_replaceable(prefix)
    return outputs


def _record_result(res: dict, builders: list, state: dict, result: PreprocessResult, files: list[str],
                   strict: bool) -> None:
    status = res["status"]
    result.records += status.size
    result.bytes += res["bytes"]
    result.empty += int((status == 1).sum())
    for file_idx, lineno, reason in res["errors"]:
        result.malformed += 1
        if strict:
            raise DataFormatError(f"{files[file_idx]}:{lineno}: {reason} (--strict stops at the first "
                                  f"malformed record; drop --strict to skip and count them)")
        if len(result.errors) < MAX_REPORTED_ERRORS:
            result.errors.append((files[file_idx], lineno, reason))
    n_ok = int((status == 0).sum())
    keep = np.ones(n_ok, dtype=bool)
    if state.get("seen") is not None:
        seen = state["seen"]
        for j, h in enumerate(res["hashes"]):
            if h in seen:
                keep[j] = False
            else:
                seen.add(h)
        result.duplicates += int((~keep).sum())
    result.documents += int(keep.sum())
    for builder, (flat, lengths) in zip(builders, res["keys"]):
        if not keep.all():
            flat = flat[np.repeat(keep, lengths)]
            lengths = lengths[keep]
        result.tokens += int(flat.size)
        builder.add_sequences(flat, lengths, document_ends=True)


@contextlib.contextmanager
def _encoder(opts: PreprocessOptions):
    """A function mapping an iterator of batches to an iterator of results, in order."""
    init = (opts.tokenizer_model, tuple(opts.json_keys), opts.append_eod, opts.prepend_bos, opts.dedup)
    if opts.workers == 1:
        _init_worker(*init)
        yield lambda batches: map(_encode_batch, batches)
        return
    # fork: workers start in milliseconds and need no importable __main__. The pool is created before any
    # progress bar, so no helper thread (tqdm's monitor) exists yet when the process forks.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(opts.workers, initializer=_init_worker, initargs=init) as pool:
        yield lambda batches: pool.imap(_encode_batch, batches, chunksize=1)


def preprocess(opts: PreprocessOptions) -> PreprocessResult:
    """Tokenize ``opts.inputs`` into ``opts.output_prefix``; raises DataFormatError on a strict failure."""
    from tqdm import tqdm

    files = check_options(opts)
    outputs = check_outputs(opts, files)
    tok = Tokenizer(opts.tokenizer_model)
    lo, hi = _partition_range(files, opts)
    sizes_known = not any(p.endswith(".gz") for p in files) and opts.num_partitions == 1
    total = sum(os.path.getsize(p) for p in files) if sizes_known else None
    result = PreprocessResult(outputs=outputs)
    state = {"seen": set() if opts.dedup else None}
    start = time.perf_counter()
    builders = [IndexedDatasetBuilder(p, vocab_size=tok.vocab_size, dtype=best_dtype(tok.vocab_size))
                for p in outputs]
    try:
        with _encoder(opts) as encode, tqdm(total=total, unit="B", unit_scale=True, desc="preprocess",
                                            disable=not opts.progress, mininterval=1.0) as bar:
            for res in encode(_batches(files, opts, lo, hi)):
                _record_result(res, builders, state, result, files, opts.strict)
                bar.update(res["bytes"])
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{result.documents / elapsed:,.0f} docs/s, "
                                    f"{result.bytes / elapsed / 1e6:.2f} MB/s", refresh=False)
        result.seconds = time.perf_counter() - start
        if result.documents == 0 and (opts.num_partitions == 1 or result.records > 0):
            raise DataFormatError(
                f"--input {' '.join(files)}: no documents to write ({result.records:,} records read: "
                f"{result.malformed:,} malformed, {result.empty:,} empty, {result.duplicates:,} duplicates)"
                + (f"; first problem: {result.errors[0][0]}:{result.errors[0][1]}: {result.errors[0][2]}"
                   if result.errors else "") + "; check --json-keys and the input files")
        sources = [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)} for p in files]
        for builder, key in zip(builders, opts.json_keys):
            builder.finalize(tokenizer_sha256=tok.sha256, eod_id=tok.eod_id, sources=sources,
                             tool="megatrain tools/preprocess_data.py", json_key=key,
                             partition=[opts.partition, opts.num_partitions] if opts.num_partitions > 1 else None,
                             append_eod=opts.append_eod, prepend_bos=opts.prepend_bos, dedup=opts.dedup)
    except BaseException:
        for builder in builders:
            builder.abort()
        raise
    for path, lineno, reason in result.errors[:MAX_REPORTED_ERRORS]:
        logger.warning("%s:%d: skipped malformed record: %s", path, lineno, reason)
    if result.malformed > len(result.errors):
        logger.warning("... and %d more malformed records", result.malformed - len(result.errors))
    return result
