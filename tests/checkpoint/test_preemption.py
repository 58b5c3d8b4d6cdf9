"""Two ranks: SIGTERM to one of them saves the same step on both and exits with the requeue code, and the
resumed job continues exactly; a stopped (hung) rank ends its peer with a message naming the phase."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from megatrain.checkpoint import layout
from megatrain.resilience import HANG_EXIT_CODE
from megatrain.trainer import REQUEUE_EXIT_CODE
from tests.checkpoint.conftest import (assert_bitwise_equal, checkpoint_tensors, loss_records, run_args, run_to_end,
                                       start_ranks, wait_for_step)

STEPS = 8


def _args(data: str, run: Path, *extra: str) -> list[str]:
    # DP=2; a checkpoint every 3 steps (one is there before a kill at step 4).
    return run_args(data, run, "checkpoint.interval=3", *extra, steps=STEPS)


@pytest.fixture(scope="module")
def ref(zygote, pattern_dataset, tmp_path_factory):
    """An uninterrupted two-rank run."""
    run = tmp_path_factory.mktemp("ref2")
    assert run_to_end(zygote, _args(pattern_dataset, run), run / "log", world=2) == [0, 0]
    return run


def _assert_continues_exactly(run: Path, ref: Path) -> None:
    expected = dict(loss_records(ref))
    assert all(x == expected[s] for s, x in loss_records(run)), (loss_records(run), expected)
    final = layout.tag_for_step(STEPS)
    assert_bitwise_equal(checkpoint_tensors(run / "checkpoints" / final), checkpoint_tensors(ref / "checkpoints" / final))


def test_kill9_of_both_ranks_then_auto_resume(zygote, pattern_dataset, tmp_path, ref):
    run, log = tmp_path / "run", tmp_path / "log"
    pids = start_ranks(zygote, _args(pattern_dataset, run), log, world=2)
    wait_for_step(run, 4, 0, zygote, pids)
    for p in pids:
        os.kill(p, signal.SIGKILL)
    assert [zygote.wait(p, 60) for p in pids] == [-signal.SIGKILL] * 2
    assert run_to_end(zygote, _args(pattern_dataset, run), log, world=2) == [0, 0]
    assert "resumed from" in Path(f"{log}.rank0").read_text()
    _assert_continues_exactly(run, ref)


def test_sigterm_to_one_rank_saves_same_step_everywhere_and_resumes_exactly(zygote, pattern_dataset, tmp_path, ref):
    run, log = tmp_path / "run", tmp_path / "log"
    # No scheduled save before the end: whichever step the signal stops at, its checkpoint is the preemption's.
    args = _args(pattern_dataset, run, f"checkpoint.interval={STEPS}")
    pids = start_ranks(zygote, args, log, world=2)
    wait_for_step(run, 4, 0, zygote, pids)
    os.kill(pids[1], signal.SIGTERM)
    codes = [zygote.wait(p, 120) for p in pids]
    assert codes == [REQUEUE_EXIT_CODE] * 2, Path(f"{log}.rank0").read_text()[-3000:]
    stopped = [re.findall(r"stopping after step (\d+)", Path(f"{log}.rank{r}").read_text()) for r in (0, 1)]
    assert stopped[0] and stopped[0] == stopped[1], "the ranks did not stop at the same step"
    step = int(stopped[0][0])
    assert "rank 1 received SIGTERM" in Path(f"{log}.rank1").read_text()
    ckpt = run / "checkpoints" / layout.tag_for_step(step)
    assert layout.is_complete(ckpt) and layout.list_checkpoints(run / "checkpoints") == [ckpt]
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank00000.pt", "rank00001.pt"]
    assert step < STEPS

    assert run_to_end(zygote, args, log, world=2) == [0, 0]
    assert f"resumed from {ckpt}" in Path(f"{log}.rank0").read_text()
    _assert_continues_exactly(run, ref)


def test_stuck_rank_ends_the_job_naming_the_phase(zygote, pattern_dataset, tmp_path):
    run, log = tmp_path / "run", tmp_path / "log"
    pids = start_ranks(zygote, _args(pattern_dataset, run, "distributed.timeout_s=6", "train.max_steps=1000"),
                       log, world=2)
    try:
        wait_for_step(run, 2, 0, zygote, pids)
        os.kill(pids[1], signal.SIGSTOP)  # alive but making no progress, like a rank stuck in a driver call
        code = zygote.wait(pids[0], 90)
    finally:
        os.kill(pids[1], signal.SIGKILL)
    text = Path(f"{log}.rank0").read_text()
    assert code != 0
    assert re.search(r"(during|in) (train step \d+|checkpoint save at step \d+)", text), text[-3000:]
    assert "distributed.timeout_s=6" in text
    if code == HANG_EXIT_CODE:
        assert "no progress" in text
    else:
        assert "a collective failed during" in text
