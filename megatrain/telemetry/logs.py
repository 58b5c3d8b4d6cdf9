"""Logging set up once per process: rank and host in every line, rank 0 verbose by default."""

from __future__ import annotations

import logging
import os
import socket
import sys


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
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_RankFilter(rank, host))
    handler.setFormatter(logging.Formatter("%(asctime)s [r%(rank)d %(host)s] %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO) if rank == 0 or all_ranks else logging.WARNING)
    root.propagate = False
    # DeepSpeed is chatty at INFO on every rank; its warnings still come through.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except Exception:  # noqa: BLE001 - deepspeed missing or changed: nothing to quiet
        pass
