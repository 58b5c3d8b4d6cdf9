"""One owner per run directory: RUN_DIR/.lock names the job that holds it (host, pid, Slurm job, start).

Two jobs on one run directory (a double sbatch, a requeue racing the old job) would delete each other's
in-progress saves and interleave metrics.jsonl. The lock is a file created with O_CREAT|O_EXCL, which is
atomic on local file systems and on NFSv3+ / Lustre / GPFS (flock is not honoured everywhere). A holder
that died does not keep it:

- holder on this host: it is gone when its pid no longer runs (or runs a process that started later:
  a reused pid);
- holder on another host: the holder touches the file every HEARTBEAT_S seconds; a lock whose mtime does
  not move for STALE_AFTER_S (watched from here, so the hosts' clocks need not agree) is stale.

A stale lock is taken over by renaming it to a unique name and checking that the renamed file is the stale
one (if another job took it over first, its fresh lock is put back), then creating a new one. Everything
that writes into the run directory happens after ``acquire``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 90.0  # three missed heartbeats


class RunDirBusy(Exception):
    """Another live job holds the run directory; the message names it."""


def _proc_start(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive_here(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    start = holder.get("proc_start")
    return start is None or _proc_start(pid) in (None, start)


def describe(holder: dict) -> str:
    job = f", Slurm job {holder['job']}" if holder.get("job") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{job}, since {since}"


class RunLock:
    """``acquire()`` or raise RunDirBusy; ``release()`` (idempotent) removes the lock if it is still ours."""

    def __init__(self, run_dir: Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.path = Path(run_dir) / LOCK_NAME
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
                   "job": os.environ.get("SLURM_JOB_ID"), "started": time.time(), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.lost: Optional[str] = None  # set by the heartbeat when the file is no longer ours

    # -- taking it

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a few rounds: a takeover can race another job's
            if self._create():
                self._start_heartbeat()
                return self
            holder = self._read(self.path)
            if holder is None:
                continue  # released between our create and read
            if not self._stale(holder):
                raise RunDirBusy(f"run.dir {self.path.parent} is in use by another job ({describe(holder)}); "
                                 f"two jobs on one run directory would delete each other's checkpoints. Wait for "
                                 f"it to end, stop it, or choose another run.dir (if that job is surely dead, "
                                 f"delete {self.path})")
            self._take_over(holder)
        raise RunDirBusy(f"run.dir {self.path.parent}: could not take {self.path} (other jobs keep taking it over)")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    @staticmethod
    def _read(path: Path) -> Optional[dict]:
        try:
            data = json.loads(path.read_text() or "{}")
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # half-written by a holder killed while creating it
            return {}

    def _stale(self, holder: dict) -> bool:
        if not holder:  # unreadable: its writer died mid-create; judge by the heartbeat like a remote one
            return self._heartbeat_stopped()
        if holder.get("host") == self.me["host"]:
            return not _alive_here(holder)
        return self._heartbeat_stopped()

    def _heartbeat_stopped(self) -> bool:
        """Watch the lock's mtime for up to stale_after_s: a live holder touches it every heartbeat_s."""
        try:
            first = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return True
        deadline = time.monotonic() + self.stale_after_s
        logged = False
        while time.monotonic() < deadline:
            try:
                if self.path.stat().st_mtime_ns != first:
                    return False
            except FileNotFoundError:
                return True
            if not logged:
                log.warning("%s is held by a job on another host; watching its heartbeat for up to %.0f s to see "
                            "whether that job is still alive", self.path, self.stale_after_s)
                logged = True
            time.sleep(min(1.0, self.heartbeat_s / 4))
        return True

    def _take_over(self, stale: dict) -> None:
        grab = self.path.with_name(f"{LOCK_NAME}.takeover-{self.me['token']}")
        try:
            os.rename(self.path, grab)
        except FileNotFoundError:
            return
        got = self._read(grab) or {}
        if got.get("token") != stale.get("token"):  # another job took over first: put its lock back
            try:
                os.link(grab, self.path)
            except FileExistsError:
                pass
        else:
            log.warning("run.dir %s: taking over the lock of a job that is gone (%s)", self.path.parent,
                        describe(stale) if stale else "unreadable lock file")
        grab.unlink(missing_ok=True)

    # -- holding it

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = self._read(self.path)
            if not holder or holder.get("token") != self.me["token"]:
                self.lost = describe(holder) if holder else "nobody (the lock file was deleted)"
                log.error("run.dir %s: the lock is now held by %s; another job may be writing here",
                          self.path.parent, self.lost)
                return
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        holder = self._read(self.path)
        if holder and holder.get("token") == self.me["token"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class _NotHolding:
    def release(self) -> None:
        pass


def hold_run_dir(run_dir: Path, rank: int, check=None) -> "RunLock | _NotHolding":
    """Rank 0 takes the run directory's lock, then runs ``check()`` (checks that must pass before anything is
    written there); every rank gets the same answer, so when another job holds the directory or the check fails
    all ranks raise the same error (RunDirBusy names the holder) before any of them writes anything."""
    import torch.distributed as dist

    lock, verdict = _NotHolding(), [None]
    if rank == 0:
        try:
            lock = RunLock(run_dir).acquire()
            if check is not None:
                check()
        except Exception as e:  # noqa: BLE001 - handed to every rank, re-raised as the same type
            lock.release()
            verdict = [(type(e), str(e))]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        kind, message = verdict[0]
        raise kind(message)
    return lock
