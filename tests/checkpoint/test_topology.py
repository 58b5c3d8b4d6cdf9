"""Resume at another topology (DP 2 -> 1 under ZeRO-1 and ZeRO-3, TP 2 -> 1, PP 2 -> 1): the losses after
resuming are those the original topology produced, within fp32 noise, because the AdamW state is
resharded from the canonical files; at the same topology that path is bitwise exact."""

from __future__ import annotations

import pytest
import torch

from megatrain.launch.testing import run_distributed
from tests.tiny import tiny_run

STEPS, SAVED = 6, 3
RTOL = 1e-5


def _args(data: str, run_dir: str) -> list[str]:
    return tiny_run(data, run_dir, STEPS, "train.micro_batch_size=2", f"checkpoint.interval={SAVED}",
                    "checkpoint.keep_last=0", "checkpoint.save_at_end=false")


def _train(data: str, run_dir: str, extra: list[str]) -> dict[int, float]:
    import torch.distributed as dist

    from megatrain.config import load_config
    from megatrain.parallel.state import ParallelState
    from megatrain.train import train_with

    cfg = load_config(None, _args(data, run_dir) + extra)
    st = ParallelState.build(cfg.parallel.tensor, cfg.parallel.pipeline)
    tr = train_with(cfg, st, torch.device("cpu"))
    dist.barrier()
    return {r["step"]: r["loss"] for r in tr.history if "loss" in r}


SOURCES = {
    "dp2_zero1": ["deepspeed.zero_stage=1"],
    "dp2_zero3": ["deepspeed.zero_stage=3"],
    "tp2": ["parallel.tensor=2"],
    "pp2": ["parallel.pipeline=2"],
}
TARGETS = {  # one process
    "dp2_zero1": ["deepspeed.zero_stage=1"],
    "dp2_zero3": ["deepspeed.zero_stage=3"],
    "tp2": [],
    "pp2": [],
}


def _sources(data: str, root: str) -> dict:
    from megatrain.checkpoint import compat

    out = {name: _train(data, f"{root}/{name}", extra) for name, extra in SOURCES.items()}
    for name in ("dp2_zero3", "tp2", "pp2"):  # DeepSpeed's own files at the same topology: bitwise
        out[f"{name}_native"] = _train(data, f"{root}/{name}-native", SOURCES[name] + [
            f"train.resume={root}/{name}/checkpoints/step_{SAVED:08d}"])
    # The resharding path at the *same* topology must reproduce DeepSpeed's own resume bit for bit.
    compat.same_topology = lambda old, new, meta: False
    out["dp2_zero1_portable"] = _train(data, f"{root}/portable", SOURCES["dp2_zero1"] + [
        f"train.resume={root}/dp2_zero1/checkpoints/step_{SAVED:08d}"])
    return out


def _targets(data: str, root: str) -> dict:
    return {name: _train(data, f"{root}/{name}-resumed", extra + [
        f"train.resume={root}/{name}/checkpoints/step_{SAVED:08d}"]) for name, extra in TARGETS.items()}


@pytest.fixture(scope="module")
def curves(pattern_dataset, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("topology"))
    source = run_distributed(_sources, 2, pattern_dataset, root)[0]
    target = run_distributed(_targets, 1, pattern_dataset, root)[0]
    return source, target


@pytest.mark.parametrize("resumed, original", [("dp2_zero1_portable", "dp2_zero1"), ("dp2_zero3_native", "dp2_zero3"),
                                               ("tp2_native", "tp2"), ("pp2_native", "pp2")])
def test_resume_at_same_topology_is_bitwise(curves, resumed, original):
    source, _ = curves
    got = source[resumed]
    assert sorted(got) == list(range(SAVED + 1, STEPS + 1))
    assert all(got[s] == source[original][s] for s in got), (got, source[original])


@pytest.mark.parametrize("name", list(SOURCES))
def test_resume_on_another_topology_continues_the_curve(curves, name):
    source, target = curves
    got, want = target[name], source[name]
    assert sorted(got) == list(range(SAVED + 1, STEPS + 1))
    errs = {s: abs(got[s] - want[s]) / abs(want[s]) for s in got}
    assert max(errs.values()) <= RTOL, f"{name} -> 1 process: relative loss errors {errs}"
