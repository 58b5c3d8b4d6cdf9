"""Start training runs as separate processes, fast: a pre-imported Python that forks them.

``python -m megatrain.train`` spends ~15 s importing torch, DeepSpeed and dynamo on the CI machine
before it trains a tiny model for a second. The tests here start dozens of runs (and kill them), so a
server process imports everything once and forks a child per run; the child calls
``megatrain.train.main(argv)`` with its own environment, working directory and log file, and exits
with its return code. Children are ordinary processes: the tests signal them (SIGKILL, SIGTERM,
SIGSTOP) by pid. The server never runs a torch op itself, so forking it is safe.

    with Zygote() as z:
        run = z.start(["model.preset=debug", ...], log="run.log", env={"RANK": "0"})
        rc = z.wait(run, timeout=120)
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]


def _serve() -> None:  # runs in the server process
    import select
    import signal
    import traceback

    import deepspeed  # noqa: F401  - everything a run imports, once
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401
    from deepspeed.runtime.zero.muon import muon_optimizer  # noqa: F401

    import megatrain.checkpoint  # noqa: F401
    import megatrain.data.loader  # noqa: F401
    import megatrain.engine  # noqa: F401
    import megatrain.train
    import megatrain.trainer  # noqa: F401

    out = sys.stdout

    def emit(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    emit({"ready": os.getpid()})
    while True:
        while True:  # reap finished children
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            emit({"exit": pid, "rc": os.waitstatus_to_exitcode(status)})
        ready, _, _ = select.select([sys.stdin], [], [], 0.05)
        if not ready:
            continue
        line = sys.stdin.readline()
        if not line:
            return
        req = json.loads(line)
        pid = os.fork()
        if pid:
            emit({"id": req["id"], "pid": pid})
            continue
        rc = 1
        try:  # the child: a fresh training process
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # as in `python -m megatrain.train`
            os.environ.update(req["env"])
            os.chdir(req["cwd"])
            rc = megatrain.train.main(req["argv"])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)


class Zygote:
    def __init__(self, timeout: float = 300):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                  "MASTER_PORT", "LOCAL_WORLD_SIZE")}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, "-u", "-c", "from tests.checkpoint.zygote import _serve; _serve()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, env=env, text=True)
        self._replies: "queue.Queue[dict]" = queue.Queue()
        self._exits: dict[int, int] = {}
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._next = 0
        self._started: set[int] = set()
        first = self._replies.get(timeout=timeout)
        if "ready" not in first:
            raise RuntimeError(f"zygote did not start: {first}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue  # a library printing on stdout during import
            if "exit" in msg:
                with self._cond:
                    self._exits[msg["exit"]] = msg["rc"]
                    self._cond.notify_all()
            else:
                self._replies.put(msg)
        with self._cond:
            self._cond.notify_all()

    def start(self, argv: list[str], log: str | os.PathLike, env: Optional[dict] = None,
              cwd: str | os.PathLike = REPO) -> int:
        """Fork a run of ``megatrain.train.main(argv)``; returns its pid."""
        self._next += 1
        req = {"id": self._next, "argv": list(argv), "log": str(log), "env": {k: str(v) for k, v in (env or {}).items()},
               "cwd": str(cwd)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = self._replies.get(timeout=60)
        self._started.add(reply["pid"])
        return reply["pid"]

    def wait(self, pid: int, timeout: float = 300) -> int:
        """Exit code of a run (negative: killed by that signal); raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while pid not in self._exits:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(f"run {pid} did not finish within {timeout:.0f} s")
                self._cond.wait(min(left, 1.0))
            return self._exits[pid]

    def poll(self, pid: int) -> Optional[int]:
        with self._cond:
            return self._exits.get(pid)

    def close(self) -> None:
        import signal

        for pid in self._started - set(self._exits):  # never leave a training run behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self) -> "Zygote":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
