"""Ten training steps through the real engine (DeepSpeed, data loader, trainer) with the sequence split:
sequence parallelism with ZeRO-1 (and selective recomputation), ZeRO-3 and PP=2; context parallelism with
ZeRO-0, ZeRO-3 (and full recomputation) and PP=2.
Every curve must match one process's within 1e-5 relative (fp32). CP=2 x TP=2 with SP trains (and
is compared with one process) in tests/checkpoint/test_context_resume.py, which also resumes it."""

import pytest

from megatrain.launch.testing import run_distributed
from tests.training.test_equivalence import _close, _many  # the same ten-step tiny run

RTOL = 1e-5


@pytest.fixture(scope="module")
def single(pattern_dataset, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("ref"))
    return run_distributed(_many, 1, pattern_dataset, run, {"single": ["train.micro_batch_size=4"]})[0]["single"]


SP = ["parallel.tensor=2", "parallel.sequence_parallel=true"]


def test_sp_and_cp_on_two_ranks(single, pattern_dataset, tmp_path):
    layouts = {
        # recomputation re-runs the sequence collectives in backward: selective here, full with CP below
        "sp_zero1_selective": ["train.micro_batch_size=4", "deepspeed.zero_stage=1",
                               "train.activation_checkpointing=selective"] + SP,
        "sp_zero3": ["train.micro_batch_size=4", "deepspeed.zero_stage=3"] + SP,
        "cp2_zero0": ["train.micro_batch_size=2", "deepspeed.zero_stage=0", "parallel.context=2"],
        "cp2_zero3_full": ["train.micro_batch_size=4", "deepspeed.zero_stage=3", "parallel.context=2",
                           "train.activation_checkpointing=full"],
    }
    got = run_distributed(_many, 2, pattern_dataset, str(tmp_path), layouts, timeout_s=600)
    for rank, per_rank in enumerate(got):
        errs = {name: _close(losses, single) for name, losses in per_rank.items()}
        assert max(errs.values()) <= RTOL, (rank, errs)


def test_sp_and_cp_with_pp2_on_four_ranks(single, pattern_dataset, tmp_path):
    layouts = {
        "sp_pp2": ["train.micro_batch_size=2", "parallel.pipeline=2"] + SP,
        "cp2_pp2": ["train.micro_batch_size=2", "parallel.context=2", "parallel.pipeline=2"],
    }
    got = run_distributed(_many, 4, pattern_dataset, str(tmp_path), layouts, timeout_s=600)
    for rank, per_rank in enumerate(got):
        for name, losses in per_rank.items():
            if losses:  # under PP only the last stage logs a loss
                assert _close(losses, single) <= RTOL, (rank, name, losses, single)
