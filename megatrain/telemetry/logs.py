"""Logging set up once per process: rank and host in every line, rank 0 verbose by default."""

from __future__ import annotations

import logging
import os
import socket
import sys


class _Handler(logging.StreamHandler):
    """A console handler that stops writing, without a "Logging error" traceback, once its reader
    has gone (``megatrain-train ... | head``)."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            from megatrain.telemetry.console import silence_stdout

            silence_stdout()
            return
        super().handleError(record)


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, host: str):
        super().__init__()
        self.rank, self.host = rank, host

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank, record.host = self.rank, self.host
        return True


def setup_logging(level: str = "INFO", rank: int | None = None, all_ranks: bool = False) -> None:
    """Rank 0 logs at ``level``; other ranks log warnings and errors unless ``all_ranks``."""
    if rank is None:
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get("OMPI_COMM_WORLD_RANK", 0))))
    host = socket.gethostname().split(".")[0]
    root = logging.getLogger("megatrain")
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = _Handler(sys.stdout)
    handler.addFilter(_RankFilter(rank, host))
    handler.setFormatter(logging.Formatter("%(asctime)s [r%(rank)d %(host)s] %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO) if rank == 0 or all_ranks else logging.WARNING)
    root.propagate = False
    # DeepSpeed is chatty at INFO on every rank; its warnings still come through. Its logger is
    # named "DeepSpeed"; importing deepspeed here would cost seconds (and its accelerator warning)
    # even for --help-config, so the level is set by name and applies once deepspeed is imported.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
