"""Append-only JSON-lines files that survive kill -9: the writer repairs a torn tail, readers skip what is not
a record. No torch here, so that tools reading metrics.jsonl start fast."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)

_RECORD_START = '{"time":'  # every record MetricsSink writes begins so


def repair_tail(path: Path) -> int:
    """Make ``path`` end at a record boundary; returns the bytes dropped.

    A kill -9 in the middle of a write leaves a last line without its newline. Appending to it would glue
    the next record onto the torn one, so that line is completed with a newline when it is a whole record,
    and cut off otherwise (it held no record anyone can read)."""
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return 0
        block = min(size, 1 << 20)  # records are short; the torn line lies in the last MiB
        f.seek(size - block)
        tail = f.read(block)
        cut = tail.rfind(b"\n")
        start = size - block + cut + 1 if cut >= 0 else size - block
        last = tail[cut + 1:] if cut >= 0 else tail
        try:
            json.loads(last)
            f.write(b"\n")  # a whole record whose newline was lost
            return 0
        except ValueError:
            f.truncate(start)
            return size - start


def open_for_append(path: Path) -> TextIO:
    dropped = repair_tail(path)
    if dropped:
        log.warning("%s: its last line was cut off (%d bytes, a write interrupted by a kill); removed it so that "
                    "new records start on a fresh line", path, dropped)
    return open(path, "a", encoding="utf-8")


def read_records(path: Path) -> tuple[list[dict], list[str]]:
    """(records, problems): every JSON object in the file, one per line; a line that is not one is reported,
    and records glued onto a torn line (files written before the writer repaired tails) are recovered."""
    records: list[dict] = []
    problems: list[str] = []
    text = path.read_bytes().decode("utf-8", errors="replace")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        found = _objects_in(line)
        if not found:
            problems.append(f"{path}:{n}: not a JSON record, skipped")
        elif len(found) > 1 or len(line.strip()) != found[0][1]:
            problems.append(f"{path}:{n}: a torn record with {len(found)} whole record(s) after it; kept those")
        records.extend(obj for obj, _ in found)
    return records, problems


def _objects_in(line: str) -> list[tuple[dict, int]]:
    """(object, length) of the whole JSON objects in one line: the line itself, or the records that start
    at a record start inside it."""
    dec = json.JSONDecoder()
    stripped = line.strip()
    try:
        obj = json.loads(stripped)
        return [(obj, len(stripped))] if isinstance(obj, dict) else []
    except ValueError:
        pass
    out: list[tuple[dict, Any]] = []
    pos = stripped.find(_RECORD_START, 1)
    while pos >= 0:
        try:
            obj, end = dec.raw_decode(stripped, pos)
            if isinstance(obj, dict):
                out.append((obj, end - pos))
            pos = stripped.find(_RECORD_START, end)
        except ValueError:
            pos = stripped.find(_RECORD_START, pos + 1)
    return out
