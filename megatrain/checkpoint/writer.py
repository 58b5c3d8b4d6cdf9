"""Writing a snapshot to disk, in the background or not, and the per-rank 'done' records.

The protocol (docs/checkpoints.md, "Asynchronous saves") uses no collective after the snapshot, so
that it can run in a thread while the training loop issues its own collectives:

1. every rank writes its files into ``.tmp-step_N/``, hashing each while it is written and fsyncing
   it; then it writes ``.tmp-step_N/done/rankNNNNN.json`` (atomically): the manifest entries of its
   files, or the error that stopped it;
2. rank 0, after its own files, waits until all ``world_size`` records exist (polling the file
   system), merges them, writes ``meta.json``, ``manifest.json`` and ``COMPLETE``, renames the
   directory to ``step_N`` and moves ``latest`` (``save.finish``).

A rank's thread ends when its record is written (rank 0's: when the checkpoint is published). A new
save waits for the thread of the previous one first, so at most one write is in flight per rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from megatrain.files import atomic_write_json, fsync_dir

log = logging.getLogger(__name__)

DONE_DIR = "done"
SLOW_ENV = "MEGATRAIN_TEST_WRITE_DELAY"  # tests: seconds to sleep before each file, so a kill lands mid-write
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL"}
_CHUNK = 64 << 20  # bytes per write: hashlib and write() release the GIL on buffers this large


class SaveError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions, I/O error); nothing of it was installed and
    the previous complete checkpoint stays the newest. A failure of the job, not of its input (exit 1)."""


def _slow() -> None:
    delay = float(os.environ.get(SLOW_ENV) or 0)
    if delay > 0:
        time.sleep(delay)


def _write_chunks(fd: int, h: Any, data: memoryview) -> None:
    for i in range(0, len(data), _CHUNK):
        part = data[i:i + _CHUNK]
        h.update(part)
        while part:
            part = part[os.write(fd, part):]


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """Write ``tensors`` in the safetensors format (an 8-byte little-endian header length, a JSON header
    of dtype, shape and byte offsets, the raw bytes), streaming from the tensors' own memory while
    hashing it; fsync. Returns the manifest entry {"size", "sha256"}."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset, views = 0, []
    for name in sorted(tensors):  # sorted, as safetensors' own writer orders them
        t = tensors[name].detach()
        if t.device.type != "cpu":
            raise ValueError(f"{name}: snapshot tensors must be in host memory")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors name here")
        t = t.contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else memoryview(b"")
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        views.append(memoryview(raw).cast("B") if t.numel() else raw)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    h = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_chunks(fd, h, memoryview(struct.pack("<Q", len(blob)) + blob))
        for v in views:
            _write_chunks(fd, h, v)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"size": 8 + len(blob) + offset, "sha256": h.hexdigest()}


def write_blob(path: Path, data: bytes) -> dict:
    """Write, fsync and hash a small file; returns its manifest entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    h = hashlib.sha256()
    try:
        _write_chunks(fd, h, memoryview(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"size": len(data), "sha256": h.hexdigest()}


def write_rank_files(tmp: Path, snap: Any, crash: Callable[[str], None]) -> dict[str, dict]:
    """This rank's files of ``snap`` under ``tmp``; returns {relpath: entry}. ``crash(phase)`` is the
    test hook that may kill the process after each kind of file."""
    entries = {}
    for rel in sorted(snap.tensors):
        _slow()
        entries[rel] = write_safetensors(tmp / rel, snap.tensors[rel], snap.tensor_meta.get(rel, {}))
        crash(rel.split("/")[0])  # "model" or "optim"
    for rel in sorted(snap.blobs):
        _slow()
        entries[rel] = write_blob(tmp / rel, snap.blobs[rel])
    crash("rng")
    for d in sorted({(tmp / r).parent for r in entries}):  # the new directory entries, before 'done' says so
        fsync_dir(d)
    crash("hashed")
    return entries


def done_path(tmp: Path, rank: int) -> Path:
    return tmp / DONE_DIR / f"rank{rank:05d}.json"


def write_done(tmp: Path, rank: int, entries: Optional[dict] = None, error: Optional[str] = None) -> None:
    path = done_path(tmp, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"rank": rank, "files": entries or {}, "error": error})


def collect_done(tmp: Path, world: int, timeout_s: float, poll_s: float = 0.02) -> dict[str, dict]:
    """Rank 0: wait until every rank's record is in ``tmp/done``; returns the merged manifest entries.
    Raises SaveError naming the rank when a record reports an error or none comes within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    records: dict[int, dict] = {}
    while len(records) < world:
        for r in range(world):
            if r in records:
                continue
            p = done_path(tmp, r)  # looked up by name: a network file system may list late, not open late
            if p.is_file():
                try:
                    records[r] = json.loads(p.read_text())
                except (OSError, json.JSONDecodeError):
                    continue  # being replaced right now: read it again on the next round
                if records[r].get("error"):
                    raise SaveError(f"{tmp.name}: rank {r} could not write its files: {records[r]['error']}")
        if len(records) < world:
            if time.monotonic() > deadline:
                missing = sorted(set(range(world)) - set(records))
                raise SaveError(f"{tmp.name}: no 'done' record from rank(s) {missing[:8]} within {timeout_s:.0f} s "
                                f"(distributed.timeout_s); those ranks died or their writes hang")
            time.sleep(poll_s)
    entries = {}
    for r in sorted(records):
        entries.update(records[r]["files"])
    return entries


class BackgroundWriter:
    """One write in flight at a time, in a non-daemon thread (so the interpreter waits for it even
    when the main thread ends unexpectedly). The result or exception of the job is kept until
    :meth:`wait` (or :meth:`take`) hands it to the main thread."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._finished: list = []  # (result, error) of jobs not yet handed over

    def submit(self, job: Callable[[], Any], name: str) -> None:
        if self.busy:
            raise RuntimeError("BackgroundWriter.submit while a write is in flight; wait() first")
        self._thread = threading.Thread(target=self._run, args=(job,), name=name, daemon=False)
        self._thread.start()

    def _run(self, job: Callable[[], Any]) -> None:
        try:
            self._finished.append((job(), None))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which reports it
            self._finished.append((None, e))

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> list:
        """Block until the write in flight (if any) ends; returns and forgets [(result, error)]."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self.take()

    def take(self) -> list:
        """The finished jobs' [(result, error)], without waiting."""
        out, self._finished = self._finished, []
        return out
