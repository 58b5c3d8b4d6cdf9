"""One owner per run directory (issue 16, class 3): the lock names its holder, a dead holder does not keep it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from megatrain.launch.run_lock import LOCK_NAME, RunDirBusy, RunLock


def _fake_holder(run_dir, **fields):
    holder = {"host": "elsewhere", "pid": 1, "job": "42", "started": time.time(), "token": "t0", **fields}
    (run_dir / LOCK_NAME).write_text(json.dumps(holder))


def test_a_live_holder_on_this_host_keeps_the_lock(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirBusy, match=rf"in use by another job \(host {os.uname().nodename}, pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()  # released
    RunLock(tmp_path).acquire().release()


def test_a_dead_holder_on_this_host_does_not(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _fake_holder(tmp_path, host=os.uname().nodename, pid=int(dead.stdout))
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    # a reused pid: alive, but a process that started after the lock was written
    _fake_holder(tmp_path, host=os.uname().nodename, pid=os.getpid(), proc_start="1")
    RunLock(tmp_path).acquire().release()


def test_a_holder_on_another_host_is_judged_by_its_heartbeat(tmp_path):
    _fake_holder(tmp_path)  # nobody touches it: stale after stale_after_s
    t0 = time.monotonic()
    lock = RunLock(tmp_path, heartbeat_s=0.1, stale_after_s=0.5).acquire()
    assert 0.4 < time.monotonic() - t0 < 5
    lock.release()
    _fake_holder(tmp_path)
    stop = threading.Event()

    def beat():  # the other host's heartbeat
        while not stop.wait(0.1):
            os.utime(tmp_path / LOCK_NAME)

    threading.Thread(target=beat, daemon=True).start()
    try:
        with pytest.raises(RunDirBusy, match="host elsewhere, pid 1, Slurm job 42"):
            RunLock(tmp_path, heartbeat_s=0.1, stale_after_s=2).acquire()
    finally:
        stop.set()


def test_the_holder_refreshes_its_heartbeat_and_notices_a_thief(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    first = (tmp_path / LOCK_NAME).stat().st_mtime_ns
    deadline = time.monotonic() + 10  # a loaded machine may delay the heartbeat thread
    while (tmp_path / LOCK_NAME).stat().st_mtime_ns == first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / LOCK_NAME).stat().st_mtime_ns != first
    _fake_holder(tmp_path)
    while not lock.lost and time.monotonic() < deadline + 10:
        time.sleep(0.05)
    assert lock.lost and "host elsewhere" in lock.lost
    lock.release()
    assert (tmp_path / LOCK_NAME).exists()  # not ours any more: left alone
