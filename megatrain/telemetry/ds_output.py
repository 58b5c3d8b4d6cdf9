"""DeepSpeed's own output, made to say what it does and nothing more.

DeepSpeed prints on its own in four places a user sees on every run and rank:

- importing it on a machine without a GPU warns "Setting accelerator to CPU" (its auto-detection
  fell through); saying ``DS_ACCELERATOR=cpu`` first is the documented way to choose it;
- ``deepspeed.init_distributed`` builds (the first time, about 90 s on 2 cores, with no word) and
  loads a shared-memory all-reduce op, then ``print``s "... built successfully";
- the bf16 optimizer and the engine ``print`` memory reports ("MA 0.04 GB Max_MA ...");
- its first use of FusedAdam / CPU Adam compiles those kernels (again a minute, silently).

:func:`use_cpu_accelerator` runs before deepspeed is imported, :func:`announce_op_build` before an
op may be compiled, and :func:`deepspeed_prints_to_debug` around calls that ``print``. Nothing here
changes what DeepSpeed computes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger(__name__)

SHM_OP = "deepspeed_shm_comm"


def use_cpu_accelerator(device_type: Optional[str] = None) -> None:
    """Tell DeepSpeed the accelerator before it guesses (and warns) at import: "cpu" when this run
    uses the CPU (``device_type``, default: no CUDA device visible). A user's own ``DS_ACCELERATOR`` wins."""
    if "DS_ACCELERATOR" in os.environ:
        return
    if device_type is None:
        import torch

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"


def _build_dir(op_name: str) -> Optional[Path]:
    try:  # where torch's JIT extension loader puts (and finds) the compiled op
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(op_name, verbose=False))
    except Exception:  # noqa: BLE001 - a private torch helper: without it we only cannot tell
        return None


def op_needs_build(op_name: str) -> bool:
    """True when loading DeepSpeed op ``op_name`` will compile it: neither installed with DeepSpeed
    (DS_BUILD_OPS=1) nor already in torch's extension cache."""
    try:
        from deepspeed.git_version_info import installed_ops

        if installed_ops.get(op_name):
            return False
    except ImportError:
        pass
    d = _build_dir(op_name)
    return d is None or not any(d.glob(f"{op_name}*.so"))


def announce_op_build(op_name: str, what: str) -> None:
    """Say so before a compile that would otherwise look like a hang."""
    if op_needs_build(op_name):
        where = _build_dir(op_name)
        log.info("compiling DeepSpeed's %s op (%s): once per machine and Python/torch version, about 1-2 "
                 "minutes; cached in %s", op_name, what, where.parent if where else "torch's extension cache")


@contextlib.contextmanager
def deepspeed_prints_to_debug(logger: logging.Logger = log) -> Iterator[None]:
    """Route what DeepSpeed ``print``s (memory reports, "built successfully") to ``logger.debug``,
    so ``logging.level=DEBUG`` still shows it. Python-level stdout only: compiler output is untouched."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        for line in buf.getvalue().splitlines():
            if line.strip():
                logger.debug("deepspeed: %s", line.strip())
