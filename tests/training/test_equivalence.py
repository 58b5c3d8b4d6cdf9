"""The same loss curve whatever the parallel layout: ZeRO 0-3, offload, TP, PP, TP x PP, accumulation."""

import pytest

from megatrain.launch.testing import run_distributed
from tests.tiny import max_rel_gap, tiny_run, train_losses

STEPS = 10
RTOL = 1e-4


def _overrides(data: str, run_dir: str) -> list[str]:
    return tiny_run(data, run_dir, STEPS, "train.resume=never", "checkpoint.save_at_end=false")


def _losses(data: str, run_dir: str, extra: list[str]) -> list[float]:
    return train_losses(_overrides(data, run_dir) + extra)


def _many(data: str, run_dir: str, layouts: dict[str, list[str]]) -> dict[str, list[float]]:
    return {name: _losses(data, f"{run_dir}/{name}", extra) for name, extra in layouts.items()}


def _close(a: list[float], b: list[float]) -> float:
    return max_rel_gap(a, b, STEPS)


@pytest.fixture(scope="module")
def reference(pattern_dataset, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("ref"))
    return run_distributed(_many, 1, pattern_dataset, run, {
        "single": ["train.micro_batch_size=4"],
        "ga4x1": ["train.micro_batch_size=1"],
    })[0]


def test_loss_falls_and_accumulation_matches(reference):
    ref = reference["single"]
    assert ref[-1] < ref[0] - 0.3, f"the loss did not fall: {ref}"
    assert _close(reference["ga4x1"], ref) <= RTOL


def test_data_parallel_zero_stages_tp_and_pp_match(reference, pattern_dataset, tmp_path):
    layouts = {
        "zero0": ["train.micro_batch_size=2", "deepspeed.zero_stage=0"],
        "zero1": ["train.micro_batch_size=2", "deepspeed.zero_stage=1"],
        "zero2": ["train.micro_batch_size=2", "deepspeed.zero_stage=2"],
        "zero3": ["train.micro_batch_size=2", "deepspeed.zero_stage=3"],
        "zero3_offload": ["train.micro_batch_size=2", "deepspeed.zero_stage=3", "deepspeed.offload=all"],
        "tp2": ["train.micro_batch_size=4", "parallel.tensor=2"],
        "pp2": ["train.micro_batch_size=2", "parallel.pipeline=2"],
    }
    got = run_distributed(_many, 2, pattern_dataset, str(tmp_path), layouts)[0]
    errs = {name: _close(losses, reference["single"]) for name, losses in got.items()}
    assert max(errs.values()) <= RTOL, errs


def test_tp2_x_pp2_on_four_ranks(reference, pattern_dataset, tmp_path):
    got = run_distributed(_many, 4, pattern_dataset, str(tmp_path),
                          {"tp2pp2": ["train.micro_batch_size=2", "parallel.tensor=2", "parallel.pipeline=2"]})
    losses = next(r for r in got if r["tp2pp2"])["tp2pp2"]
    assert _close(losses, reference["single"]) <= RTOL
