"""Keep the workers' exit code through a launcher that replaces it (torchrun exits 1 for any failed worker).

megatrain exits 75 (REQUEUE_EXIT_CODE) after a signal-triggered save, 2 for bad input, 3 when training
diverged, 124 when a rank hung. torchrun reports every non-zero worker exit as its own exit code 1, so a
wrapper or scheduler cannot tell "preempted and saved" from "crashed". So each worker writes its code to
``$MEGATRAIN_EXIT_DIR/rank-<RANK>`` as it exits, and this wrapper runs the launcher with a fresh such
directory and exits with the code the workers meant:

    python -m megatrain.launch.exit_status -- torchrun --nproc_per_node 8 -m megatrain.train --config c.yaml

Rule: a worker code other than 0 and 75 wins (the first one written); else 75 if any worker said 75; else
the launcher's own code (a worker that died before writing, e.g. kill -9, leaves the launcher's code).
Signals the wrapper receives (TERM, INT, USR1, USR2, HUP) are passed on to the launcher.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

ENV = "MEGATRAIN_EXIT_DIR"
REQUEUE = 75  # megatrain.trainer.REQUEUE_EXIT_CODE (tests check they agree)
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def record(code: int, environ=os.environ) -> None:
    """Write this worker's exit code where the wrapper looks (nothing when no wrapper asked for it)."""
    folder = environ.get(ENV)
    if not folder:
        return
    rank = environ.get("RANK", "0")
    path = Path(folder) / f"rank-{rank}"
    try:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(f"{int(code)}\n")
        os.replace(tmp, path)
    except OSError:  # the wrapper's directory is gone: nothing to tell
        pass


def worker_codes(folder: Path) -> list[tuple[str, int]]:
    """(rank file, code) oldest first."""
    out = []
    for p in sorted(folder.glob("rank-*"), key=lambda p: p.stat().st_mtime_ns):
        try:
            out.append((p.name, int(p.read_text().strip())))
        except (OSError, ValueError):
            continue
    return out


def resolve(launcher_code: int, codes: list[tuple[str, int]]) -> int:
    failed = [c for _, c in codes if c not in (0, REQUEUE)]
    if failed:
        return failed[0]
    if any(c == REQUEUE for _, c in codes):
        return REQUEUE
    return launcher_code


def run(cmd: list[str]) -> int:
    folder = Path(tempfile.mkdtemp(prefix="megatrain-exit-"))
    try:
        proc = subprocess.Popen(cmd, env={**os.environ, ENV: str(folder)})
        for sig in FORWARDED:
            signal.signal(sig, lambda s, _f: proc.send_signal(s))
        code = proc.wait()
        code = 128 - code if code < 0 else code  # killed by a signal: the shell's convention
        final = resolve(code, worker_codes(folder))
        if final != code:
            sys.stderr.write(f"exit_status: the launcher exited {code}; the workers exited {final} "
                             f"({', '.join(f'{n}={c}' for n, c in worker_codes(folder))}); exiting {final}\n")
        return final
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        sys.stderr.write(__doc__)
        return 2
    try:
        return run(argv)
    except FileNotFoundError as e:
        sys.stderr.write(f"exit_status: {argv[0]}: cannot run it ({e.strerror})\n")
        return 127


if __name__ == "__main__":
    sys.exit(main())
