"""Resume at another topology (DP 2 -> 1 under ZeRO-1 and ZeRO-3, TP 2 -> 1, PP 2 -> 1): the losses after
resuming are those the original topology produced, within fp32 noise, because the AdamW state is
resharded from the canonical files. At the same topology (ZeRO-0/1/2/3, ZeRO-3 with offload, bf16,
TP=2, PP=2) the same files give a bitwise resume: checkpoints hold no DeepSpeed-format copy."""

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


SAME_ONLY = {  # resumed at the same topology only
    "dp2_zero0": ["deepspeed.zero_stage=0"],
    "dp2_zero2": ["deepspeed.zero_stage=2"],
    "dp2_bf16": ["deepspeed.zero_stage=1", "train.precision=bf16"],
    "dp2_zero3_offload": ["deepspeed.zero_stage=3", "deepspeed.offload=all"],
}


def _sources(data: str, root: str) -> dict:
    runs = {**SOURCES, **SAME_ONLY}
    out = {name: _train(data, f"{root}/{name}", extra) for name, extra in runs.items()}
    for name, extra in runs.items():  # the canonical files at the same topology
        out[f"{name}_same"] = _train(data, f"{root}/{name}-same", extra + [
            f"train.resume={root}/{name}/checkpoints/step_{SAVED:08d}"])
    return out


def _targets(data: str, root: str) -> dict:
    return {name: _train(data, f"{root}/{name}-resumed", extra + [
        f"train.resume={root}/{name}/checkpoints/step_{SAVED:08d}"]) for name, extra in TARGETS.items()}


@pytest.fixture(scope="module")
def curves(pattern_dataset, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("topology"))
    source = run_distributed(_sources, 2, pattern_dataset, root)[0]
    target = run_distributed(_targets, 1, pattern_dataset, root)[0]
    return source, target, root


@pytest.mark.parametrize("original", [*SOURCES, *SAME_ONLY])
def test_resume_at_same_topology_is_bitwise(curves, original):
    source, _, _ = curves
    got = source[f"{original}_same"]
    assert sorted(got) == list(range(SAVED + 1, STEPS + 1))
    assert all(got[s] == source[original][s] for s in got), (got, source[original])


def test_checkpoint_holds_each_tensor_once(curves, tmp_path_factory):
    """No DeepSpeed copy: model/ (weights), optim/ (two moments; fp32 masters only for bf16), rng/, meta."""
    from pathlib import Path

    from safetensors import safe_open

    root = Path(curves[2])
    for name, masters in (("dp2_zero1", False), ("dp2_bf16", True)):
        ckpt = root / name / "checkpoints" / f"step_{SAVED:08d}"
        assert sorted(p.name for p in ckpt.iterdir()) == ["COMPLETE", "manifest.json", "meta.json", "model", "optim",
                                                          "rng"]
        with safe_open(str(ckpt / "optim" / "tp00_pp00.safetensors"), framework="pt") as f:
            kinds = {k.rsplit("/", 1)[1] for k in f.keys()}  # noqa: SIM118 - a safetensors handle
        assert kinds == ({"exp_avg", "exp_avg_sq", "fp32"} if masters else {"exp_avg", "exp_avg_sq"}), name


@pytest.mark.parametrize("name", list(SOURCES))
def test_resume_on_another_topology_continues_the_curve(curves, name):
    source, target, _ = curves
    got, want = target[name], source[name]
    assert sorted(got) == list(range(SAVED + 1, STEPS + 1))
    errs = {s: abs(got[s] - want[s]) / abs(want[s]) for s in got}
    assert max(errs.values()) <= RTOL, f"{name} -> 1 process: relative loss errors {errs}"
