"""The one tiny training run the tests share: the debug model on a 32-token window, 4 samples a step,
fp32, every step logged, no evaluation or samples. Tests add what they vary after it (a later
``key=value`` wins)."""

from __future__ import annotations

TINY_RUN = ["model.preset=debug", "data.split=100,0,0", "train.seq_len=32", "train.global_batch_size=4",
            "train.precision=fp32", "logging.interval=1", "eval.steps=0", "eval.sample_tokens=0",
            "optimizer.lr=3e-3", "schedule.warmup_steps=2"]


def tiny_run(data: object, run_dir: object, steps: int, *extra: str) -> list[str]:
    """Overrides for the shared tiny run reading ``data`` into ``run_dir`` for ``steps`` steps."""
    return [*TINY_RUN, f"data.path={data}", f"run.dir={run_dir}", f"train.max_steps={steps}", *extra]


def train_losses(overrides: list[str]) -> list[float]:
    """Train one run in the current process group (every rank calls it) and return its logged losses."""
    import torch
    import torch.distributed as dist

    from megatrain.config import load_config
    from megatrain.parallel.state import ParallelState
    from megatrain.train import train_with

    cfg = load_config(None, overrides)
    p = cfg.parallel
    st = ParallelState.build(p.tensor, p.pipeline, p.context)
    tr = train_with(cfg, st, torch.device("cpu"))
    dist.barrier()
    return [r["loss"] for r in tr.history if "loss" in r]


def max_rel_gap(a: list[float], b: list[float], steps: int) -> float:
    """The largest per-step relative difference of two loss curves of ``steps`` steps each."""
    assert len(a) == len(b) == steps
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))
