"""logging.pipeline_timing: per-stage compute time and the measured pipeline bubble next to (p-1)/m."""

import math

import pytest
import torch

from megatrain.config import ConfigError, load_config
from megatrain.telemetry.pipe_timing import bubble_fraction
from megatrain.launch.testing import run_distributed
from tests.tiny import tiny_run


def test_bubble_arithmetic():
    # 100 ms step, 60 ms compute, 20 ms reduction + optimizer: 20 ms of waiting on 60 ms of compute
    assert bubble_fraction(100.0, 60.0, 20.0) == pytest.approx(1 / 3)
    assert bubble_fraction(50.0, 60.0, 0.0) == 0.0  # clock jitter never gives a negative bubble
    assert math.isnan(bubble_fraction(10.0, 0.0, 0.0))


def test_needs_a_pipeline():
    with pytest.raises(ConfigError, match="logging.pipeline_timing"):
        load_config(None, ["model.preset=debug", "logging.pipeline_timing=true"])


def _history(data: str, run_dir: str) -> list[dict]:
    from megatrain.parallel.state import ParallelState
    from megatrain.train import train_with

    cfg = load_config(None, tiny_run(data, run_dir, 4, "train.micro_batch_size=1", "train.resume=never",
                                     "logging.interval=2", "eval.steps=1", "eval.interval=2",
                                     "checkpoint.save_at_end=false", "parallel.pipeline=2",
                                     "logging.pipeline_timing=true"))
    st = ParallelState.build(cfg.parallel.tensor, cfg.parallel.pipeline)
    return train_with(cfg, st, torch.device("cpu")).history


def test_stages_report_compute_and_bubble(pattern_dataset, tmp_path):
    hist = run_distributed(_history, 2, pattern_dataset, str(tmp_path))
    steps = [r for r in hist[0] if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4]
    for rec in steps:
        assert rec["pipe_bubble_theory"] == pytest.approx(0.25)  # p = 2 stages, m = 4 micro-batches
        assert len(rec["pipe_bubble"]) == len(rec["pipe_compute_ms"]) == 2
        assert all(c > 0 for c in rec["pipe_compute_ms"])
        assert all(s >= c for s, c in zip(rec["pipe_step_ms"], rec["pipe_compute_ms"]))
        assert all(0 <= b < 20 for b in rec["pipe_bubble"])
        # a stage waits for its neighbour at the start or the end of every step
        assert max(rec["pipe_bubble"]) > 0
        assert 0 <= rec["pipe_bubble_step"] < 20 and all(u >= 0 for u in rec["pipe_update_ms"])
    # the other stage saw the same exchanged figures
    assert [r["pipe_compute_ms"] for r in hist[1] if "loss" in r] == [r["pipe_compute_ms"] for r in steps]
