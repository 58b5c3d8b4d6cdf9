"""Command-line tools' standard output, when whoever reads it stops early (``tool | head``).

A write to a closed pipe raises BrokenPipeError in Python (SIGPIPE is ignored), which ends a tool
in a traceback, and again at exit when Python flushes stdout. Reading part of the output on
purpose is not an error: the tool stops quietly with the shell's status for SIGPIPE.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process ended by SIGPIPE


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that later writes and the flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout already closed or not a file: nothing left to protect
        pass


def pipe_safe(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a tool's ``main``: a closed stdout ends it quietly with status 141."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            code = main(*args, **kwargs)
            sys.stdout.flush()  # inside the try: the last buffered lines may meet the closed pipe too
            return code
        except BrokenPipeError:
            silence_stdout()
            return EXIT_BROKEN_PIPE

    return wrapper
