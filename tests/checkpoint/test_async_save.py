"""Asynchronous saves: kill -9 while the background thread writes (the newest complete checkpoint always
loads, the resumed curve is the uninterrupted one), a failed background write on one rank (reported,
not published, the previous checkpoint stays the newest, training goes on), and the save times in
metrics.jsonl."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import torch

from megatrain.checkpoint import layout
from megatrain.checkpoint.select import find_checkpoint
from megatrain.launch.testing import run_distributed
from tests.checkpoint.conftest import STEPS, assert_bitwise_equal, checkpoint_tensors, loss_records, run_args, \
    run_to_end
from tests.checkpoint.test_kill_resume import _assert_same_curve, _newest_step
from tests.tiny import tiny_run

TRIALS = 5
DELAY = 0.15  # seconds before each of a save's 3 files (model, optim, rng): a write lasts > 0.45 s


def _wait_for_write(run: Path, after: int, pid: int, zygote, timeout: float = 120) -> Path:
    """The temporary directory of a save newer than step ``after`` once it exists (its write has begun)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        root = run / "checkpoints"
        for p in root.glob(".tmp-step_*") if root.is_dir() else []:
            step = layout.step_of_tag(p.name[len(".tmp-"):])
            if step is not None and step > after:
                return p
        assert zygote.poll(pid) is None, f"the run ended (rc {zygote.poll(pid)}) before a save after step {after}"
        time.sleep(0.005)
    raise TimeoutError(f"no save after step {after} within {timeout} s")


def test_kill9_during_background_write(zygote, pattern_dataset, tmp_path, reference):
    seed = int(os.environ.get("MEGATRAIN_KILL_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    print(f"MEGATRAIN_KILL_SEED={seed}")
    run, log = tmp_path / "run", tmp_path / "log"
    args = run_args(pattern_dataset, run, "checkpoint.async_save=true")
    for trial in range(TRIALS):
        start = _newest_step(run)
        pid = zygote.start(args, log=log, env={"MEGATRAIN_TEST_WRITE_DELAY": str(DELAY)})
        tmp = _wait_for_write(run, start, pid, zygote)
        time.sleep(rng.uniform(0.0, 2.5 * DELAY))  # before the last file of that write has started
        os.kill(pid, signal.SIGKILL)
        assert zygote.wait(pid, 60) == -signal.SIGKILL, f"seed {seed}: trial {trial} was not killed"
        assert tmp.is_dir() and not layout.is_complete(tmp), f"seed {seed}: the write of {tmp.name} had ended"
        newest = find_checkpoint(run / "checkpoints", verify="full")  # the one training would load
        if start:
            assert newest is not None and layout.step_of_tag(newest.name) >= start, (seed, trial, newest)
    rc = run_to_end(zygote, args, log)
    assert rc == [0], log.read_text()[-3000:]
    _assert_same_curve(run, reference)
    assert_bitwise_equal(checkpoint_tensors(run / "checkpoints" / layout.tag_for_step(STEPS)), reference["final"])
    saves = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"save_blocked_s"' in x]
    assert saves and all(r["save_async"] and r["save_total_s"] >= r["save_blocked_s"] for r in saves)


def _failing_rank1_at_step2(data: str, run_dir: str) -> list:
    import megatrain.checkpoint.writer as writer
    from megatrain.config import load_config
    from megatrain.parallel.state import ParallelState
    from megatrain.train import train_with

    real = writer.write_safetensors
    rank = torch.distributed.get_rank()

    def flaky(path, tensors, metadata):
        if rank == 1 and ".tmp-step_00000002" in str(path):
            raise OSError(28, "No space left on device (test)")
        return real(path, tensors, metadata)

    writer.write_safetensors = flaky
    cfg = load_config(None, tiny_run(data, run_dir, 4, "train.micro_batch_size=1", "parallel.tensor=2",
                                     "checkpoint.interval=1", "checkpoint.keep_last=0", "checkpoint.async_save=true"))
    tr = train_with(cfg, ParallelState.build(2, 1), torch.device("cpu"))
    return tr.history


def test_failed_background_write_is_reported_and_not_published(pattern_dataset, tmp_path):
    history = run_distributed(_failing_rank1_at_step2, 2, pattern_dataset, str(tmp_path))[0]
    root = tmp_path / "checkpoints"
    assert [p.name for p in layout.list_checkpoints(root)] == [layout.tag_for_step(s) for s in (1, 3, 4)]
    errors = [r for r in history if "save_error" in r]
    assert len(errors) == 1 and "rank 1" in errors[0]["save_error"] and "No space left" in errors[0]["save_error"]
    assert sorted(s for s, _ in loss_records(tmp_path)) == [1, 2, 3, 4]  # training went on
    assert not (root / ".tmp-step_00000002").exists()  # removed by the next save
