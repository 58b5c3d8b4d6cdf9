"""Issue 16, classes 1, 3, 4, 5 and disk full: nothing a run wrote is lost.

- the final save comes before the final evaluation and samples, and optional work failing costs nothing;
- one job per run directory: a second one exits 2 naming the first and touches nothing;
- auto-resume never starts from scratch over step directories, and a save never deletes a checkpoint newer
  than the one resumed from (it is set aside);
- Ctrl-C saves and exits 75 like SIGTERM; a second Ctrl-C stops at once; no KeyboardInterrupt traceback;
- a save that hits a full disk is one clear error, its temporary directory removed, the previous
  checkpoint still the newest complete one.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from megatrain.checkpoint import layout
from megatrain.checkpoint.save import CRASH_ENV
from megatrain.trainer import REQUEUE_EXIT_CODE
from tests.checkpoint.conftest import loss_records, run_args, run_to_end, start_ranks, wait_for_step


def _long(data, run, *extra):
    return run_args(data, run, "checkpoint.interval=50", *extra, steps=400)


def _tags(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))


def test_second_job_on_a_run_directory_exits_naming_the_first(zygote, pattern_dataset, tmp_path):
    run, log = tmp_path / "run", tmp_path / "a.log"
    first = start_ranks(zygote, _long(pattern_dataset, run), log)
    wait_for_step(run, 2, 0, zygote, first)
    assert run_to_end(zygote, _long(pattern_dataset, run), tmp_path / "b.log") == [2]
    out = (tmp_path / "b.log").read_text()
    assert f"is in use by another job (host {os.uname().nodename}, pid {first[0]}" in out and "Traceback" not in out
    os.kill(first[0], signal.SIGTERM)  # the first job went on undisturbed; it stops cleanly
    assert zygote.wait(first[0], 120) == REQUEUE_EXIT_CODE
    steps = [s for s, _ in loss_records(run)]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no second stream of records
    assert not (run / ".lock").exists()  # released at exit
    # a job killed with -9 does not keep the run directory
    third = start_ranks(zygote, _long(pattern_dataset, run), log)
    wait_for_step(run, steps[-1] + 1, len(steps), zygote, third)
    os.kill(third[0], signal.SIGKILL)
    zygote.wait(third[0], 60)
    assert (run / ".lock").exists()
    assert run_to_end(zygote, run_args(pattern_dataset, run, "train.resume_allow_changes=[schedule]",
                                       steps=steps[-1] + 2), tmp_path / "c.log") == [0]
    assert "taking over the lock of a job that is gone" in (tmp_path / "c.log").read_text()


def test_auto_resume_never_starts_fresh_over_step_directories(zygote, pattern_dataset, tmp_path):
    run, log = tmp_path / "run", tmp_path / "log"
    assert run_to_end(zygote, run_args(pattern_dataset, run, steps=3), log) == [0]
    for tag in _tags(run):
        (run / "checkpoints" / tag / layout.COMPLETE).unlink()  # e.g. copied without the marker
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert run_to_end(zygote, run_args(pattern_dataset, run, steps=5), tmp_path / "b.log") == [2]
    out = (tmp_path / "b.log").read_text()
    assert "holds 3 step directories but no complete checkpoint" in out and "touch " in out, out[-2000:]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before  # nothing touched
    # told to start over: they are set aside, not overwritten
    assert run_to_end(zygote, run_args(pattern_dataset, run, "train.resume=never", steps=3), log) == [0]
    aside = sorted(p.name for p in (run / "checkpoints").iterdir() if ".superseded-" in p.name)
    assert [a.split(".")[0] for a in aside] == ["step_00000001", "step_00000002", "step_00000003"]


def test_a_save_never_deletes_a_newer_checkpoint(zygote, pattern_dataset, tmp_path):
    run, log = tmp_path / "run", tmp_path / "log"
    keep = ("checkpoint.keep_last=2", "schedule.decay_steps=6")
    assert run_to_end(zygote, run_args(pattern_dataset, run, *keep, steps=4), log) == [0]
    stray = run / "checkpoints" / "step_00000004" / "notes.txt"
    stray.write_text("mine")  # step 4 is now unusable: resume falls back to step 3
    assert run_to_end(zygote, run_args(pattern_dataset, run, *keep, steps=6), log) == [0]
    text = log.read_text()
    assert "resuming from step_00000003 although step_00000004 is newer" in text
    aside = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_00000004.superseded-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "mine"
    assert _tags(run)[-2:] == ["step_00000005", "step_00000006"]


def test_ctrl_c_saves_and_exits_75_a_second_one_stops_at_once(zygote, pattern_dataset, tmp_path):
    run, log = tmp_path / "run", tmp_path / "log"
    pids = start_ranks(zygote, _long(pattern_dataset, run), log)
    wait_for_step(run, 2, 0, zygote, pids)
    os.kill(pids[0], signal.SIGINT)
    assert zygote.wait(pids[0], 120) == REQUEUE_EXIT_CODE
    text = log.read_text()
    assert "KeyboardInterrupt" not in text and "Traceback" not in text
    step = layout.step_of_tag(_tags(run)[-1])
    assert step >= 2 and f"stopping after step {step}" in text
    pids = start_ranks(zygote, _long(pattern_dataset, run), tmp_path / "b.log")
    wait_for_step(run, step + 2, 0, zygote, pids)
    os.kill(pids[0], signal.SIGINT)
    deadline = time.monotonic() + 30
    while "press Ctrl-C again" not in (tmp_path / "b.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pids[0], signal.SIGINT)
    assert zygote.wait(pids[0], 60) == -signal.SIGINT  # the shell reports 130
    assert "Traceback" not in (tmp_path / "b.log").read_text()


def test_disk_full_during_a_save(zygote, pattern_dataset, tmp_path):
    run, log = tmp_path / "run", tmp_path / "log"
    # the synchronous path: every rank agrees on the failure and stops (a background write reports it and
    # training goes on: tests/checkpoint/test_async_save.py)
    args = run_args(pattern_dataset, run, "checkpoint.interval=2", "checkpoint.async_save=false", steps=6)
    assert run_to_end(zygote, args, log, env_extra={CRASH_ENV: "enospc:model@4"}) == [1]
    text = log.read_text()
    assert "job failed: checkpoint save at step 4 failed on 1 rank(s) (rank 0: No space left on device" in text
    assert "the newest complete checkpoint is still step_00000002" in text and "Traceback" not in text
    assert _tags(run) == ["step_00000002"] and not [p for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert run_to_end(zygote, args, log) == [0]  # space freed: it resumes from step 2 and finishes
    assert "resumed from" in log.read_text()
