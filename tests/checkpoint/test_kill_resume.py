"""kill -9 of a whole run at random steps, or during a save, then auto-resume: the rest of the loss curve
and the final weights are bitwise those of an uninterrupted run."""

from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

from megatrain.checkpoint import layout
from tests.checkpoint.conftest import (STEPS, assert_bitwise_equal, checkpoint_tensors, loss_records, run_args,
                                       run_to_end, wait_for_step)


def _assert_same_curve(run: Path, reference: dict) -> None:
    recs = loss_records(run)
    assert {s for s, _ in recs} == set(range(1, STEPS + 1))
    wrong = [(s, x, reference["losses"][s]) for s, x in recs if x != reference["losses"][s]]
    assert not wrong, f"losses differ from the uninterrupted run (step, got, expected): {wrong[:5]}"


def _resumed_step(log_text: str) -> int | None:
    found = re.findall(r"resumed from \S+step_(\d+): step", log_text)
    return int(found[-1]) if found else None


def test_three_n_saves_keep_n(reference):
    # The reference saved at every one of its 10 steps with checkpoint.keep_last=3.
    left = layout.list_checkpoints(reference["dir"] / "checkpoints")
    assert [p.name for p in left] == [layout.tag_for_step(s) for s in (STEPS - 2, STEPS - 1, STEPS)]
    assert (reference["dir"] / "checkpoints" / "latest").read_text().strip() == layout.tag_for_step(STEPS)


def _newest_step(run: Path) -> int:
    done = layout.list_checkpoints(run / "checkpoints")
    return layout.step_of_tag(done[-1].name) if done else 0


def test_kill9_at_random_steps_then_auto_resume(zygote, pattern_dataset, tmp_path, reference):
    seed = int(os.environ.get("MEGATRAIN_KILL_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    print(f"MEGATRAIN_KILL_SEED={seed}")  # shown with a failure: replays the same kill steps
    run, log = tmp_path / "run", tmp_path / "log"
    args = run_args(pattern_dataset, run)
    # Each kill lands one or two steps after the run resumed, then up to about one step-and-save of
    # this tiny model later: mid-step, mid-save or between. Kill steps are picked from where the run
    # really resumed (a kill can land a step or two past its target), and the kills stop early
    # enough to leave the wall-time stop below at least two steps.
    kills = []
    while len(kills) < 5 and (start := _newest_step(run)) <= STEPS - 6:
        k = start + rng.randint(1, 2)
        before = len(loss_records(run))
        pid = zygote.start(args, log=log)
        wait_for_step(run, k, before, zygote, [pid])
        time.sleep(rng.uniform(0, 0.03))
        os.kill(pid, signal.SIGKILL)
        assert zygote.wait(pid, 60) == -signal.SIGKILL, f"seed {seed}: the run was not killed at step {k}"
        kills.append(k)
    assert len(kills) >= 2, f"seed {seed}: only {len(kills)} kill(s) landed"
    left = STEPS - _newest_step(run)
    assert left >= 2, f"seed {seed}: after kills at {kills} only {left} step(s) are left for the wall-time stop"
    # One more interruption, by the wall-time budget (spent before the first step): it saves and asks
    # to be requeued.
    rc = run_to_end(zygote, args + ["train.max_wall_time=0.001"], log)
    assert rc == [75], f"seed {seed}: max_wall_time did not stop the run with the requeue code"
    assert "max_wall_time" in log.read_text()
    rc = run_to_end(zygote, args, log)
    assert rc == [0], log.read_text()[-3000:]
    assert _resumed_step(log.read_text()) is not None
    _assert_same_curve(run, reference)
    assert_bitwise_equal(checkpoint_tensors(run / "checkpoints" / layout.tag_for_step(STEPS)), reference["final"])


def test_rerun_of_a_finished_run_trains_nothing_and_keeps_its_checkpoint(zygote, pattern_dataset, tmp_path,
                                                                         reference):
    import shutil

    run, log = tmp_path / "run", tmp_path / "log"
    shutil.copytree(reference["dir"], run)
    final = run / "checkpoints" / layout.tag_for_step(STEPS)
    before = {p: p.stat().st_mtime_ns for p in final.rglob("*")}
    assert run_to_end(zygote, run_args(pattern_dataset, run, "checkpoint.keep_last=3"), log) == [0]
    assert f"already at step {STEPS} (train.max_steps={STEPS}): nothing to train" in log.read_text()
    assert {p: p.stat().st_mtime_ns for p in final.rglob("*")} == before  # not saved again


# A crash at each of these points of a save: before the checkpoint is published (the previous one must be
# loaded) or after (this one).
CRASHES = [("snapshot", False), ("optim", False), ("hashed", False), ("manifest", False), ("complete", False),
           ("renamed", True), ("latest", True)]


def test_kill9_during_save_loads_newest_complete(zygote, pattern_dataset, tmp_path, reference):
    run, log = tmp_path / "run", tmp_path / "log"
    args = run_args(pattern_dataset, run)
    for i, (phase, published) in enumerate(CRASHES):
        step = i + 2
        rc = run_to_end(zygote, args, log, env_extra={"MEGATRAIN_TEST_CRASH_AT": f"{phase}@{step}"})
        assert rc == [-signal.SIGKILL], f"crash at {phase}@{step} did not happen: {log.read_text()[-2000:]}"
        newest = layout.list_checkpoints(run / "checkpoints")[-1]
        assert newest.name == layout.tag_for_step(step if published else step - 1), phase
        assert not any(p.name.startswith("step_") and not layout.is_complete(p)
                       for p in (run / "checkpoints").iterdir())
    rc = run_to_end(zygote, args, log)
    assert rc == [0], log.read_text()[-3000:]
    starts = [int(s) for s in re.findall(r"resumed from \S+step_(\d+): step", log.read_text())]
    assert starts == [step - (0 if published else 1) for step, (_, published) in enumerate(CRASHES, start=2)]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")], "leftover temporaries"
    _assert_same_curve(run, reference)
    assert_bitwise_equal(checkpoint_tensors(run / "checkpoints" / layout.tag_for_step(STEPS)), reference["final"])


DOCUMENTS = ["data.document_mask=true", "data.eod_mask_loss=true"]


def test_kill9_with_the_document_mask_resumes_exactly(zygote, pattern_dataset, tmp_path, reference):
    """Packed samples that respect documents (their layout read from the cached sample index): a run
    killed mid-way resumes onto the uninterrupted masked run's curve and weights, bitwise."""
    steps = 6  # fewer than the other tests: the layout adds nothing per step to resume
    ref, run, log = tmp_path / "ref", tmp_path / "run", tmp_path / "log"
    args = lambda d: run_args(pattern_dataset, d, *DOCUMENTS, steps=steps)  # noqa: E731
    assert run_to_end(zygote, args(ref), tmp_path / "ref.log") == [0]
    losses = dict(loss_records(ref))
    assert sorted(losses) == list(range(1, steps + 1))
    assert [losses[s] for s in losses] != [reference["losses"][s] for s in losses], "the mask changed nothing"
    kill_at = random.Random(os.environ.get("MEGATRAIN_KILL_SEED")).randint(2, 4)
    pid = zygote.start(args(run), log=log)
    wait_for_step(run, kill_at, 0, zygote, [pid])
    os.kill(pid, signal.SIGKILL)
    assert zygote.wait(pid, 60) == -signal.SIGKILL
    assert run_to_end(zygote, args(run), log) == [0], log.read_text()[-3000:]
    assert _resumed_step(log.read_text()) is not None
    recs = loss_records(run)
    assert {s for s, _ in recs} == set(range(1, steps + 1))
    assert all(x == losses[s] for s, x in recs), f"resumed losses differ: {recs} vs {losses}"
    final = layout.tag_for_step(steps)
    assert_bitwise_equal(checkpoint_tensors(run / "checkpoints" / final), checkpoint_tensors(ref / "checkpoints" / final))
