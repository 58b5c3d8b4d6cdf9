"""A NaN on one rank: no rank applies that update (ZeRO 0-3, pipeline), or the run stops (abort); the
skip/abort/spike policy itself."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from megatrain.launch.testing import run_distributed
from tests.tiny import tiny_run

STEPS = 4


def _args(data: str, run_dir: str) -> list[str]:
    return tiny_run(data, run_dir, STEPS, "train.micro_batch_size=1", "train.resume=never",
                    "checkpoint.save_at_end=false", "schedule.warmup_steps=1")


def _snapshot(tr) -> list[torch.Tensor]:
    """Everything an update changes, as this rank holds it: parameters (ZeRO-3: the local partition) and the
    optimizer's state under DeepSpeed's wrappers."""
    from megatrain.engine.internals import update_optimizers

    out = [(p.ds_tensor if hasattr(p, "ds_tensor") else p).detach().clone() for p in tr.engine.module.parameters()]
    for opt in update_optimizers(tr.engine.optimizer):
        for st in opt.state.values():
            out += [v.detach().clone() for v in st.values() if torch.is_tensor(v)]
    return out


@contextlib.contextmanager
def _poison(tr, active: bool, how: str):
    """For one step, make this rank's loss NaN ("nan": the model's loss, so gradients follow), or only the
    loss the guard sees ("verdict": gradients stay finite, so DeepSpeed's own overflow check cannot be
    what prevents the update)."""
    if not active:
        yield
        return
    if how == "verdict":
        target, name = tr.guard, "_local_loss_sum"
        original = getattr(target, name)
        target._local_loss_sum = lambda: original() * float("nan")
        try:
            yield
        finally:
            del target._local_loss_sum
        return
    target = tr.engine.module
    name = "loss_fn" if tr.built.is_pipeline else "forward"
    original = getattr(target, name)
    setattr(target, name, lambda *a, **k: original(*a, **k) * float("nan"))
    try:
        yield
    finally:
        if name == "forward":
            del target.forward
        else:
            target.loss_fn = original


def _run(data: str, run_dir: str, extra: list[str], nan_step: int, nan_rank: int, how: str) -> dict:
    import torch.distributed as dist

    from megatrain import trainer as T
    from megatrain.config import load_config
    from megatrain.parallel.state import ParallelState
    from megatrain.train import train_with

    cfg = load_config(None, _args(data, run_dir) + extra)
    st = ParallelState.build(cfg.parallel.tensor, cfg.parallel.pipeline)
    seen: dict = {}
    original = T.Trainer.train_step

    def train_step(self):
        if self.step + 1 != nan_step:
            return original(self)
        before = _snapshot(self)
        with _poison(self, self.st.rank == nan_rank, how):
            loss = original(self)
        after = _snapshot(self)
        seen["unchanged"] = len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
        seen["outcome"] = self.guard.last
        return loss

    T.Trainer.train_step = train_step
    try:
        tr = train_with(cfg, st, torch.device("cpu"))
    finally:
        T.Trainer.train_step = original
    dist.barrier()
    out = seen["outcome"]
    return {"unchanged": seen["unchanged"], "applied": out.applied, "reason": out.skip_reason,
            "abort": out.abort_reason, "exit": tr.exit_code, "skipped": tr.guard.counters.skipped,
            "steps": [r["step"] for r in tr.history if "loss" in r],
            "finite_after": all(math.isfinite(r["loss"]) for r in tr.history if "loss" in r and r["step"] > nan_step)}


def _many(data: str, root: str, cases: dict) -> dict:
    return {name: _run(data, f"{root}/{name}", *case) for name, case in cases.items()}


CASES = {
    # name: (overrides, step that gets the NaN, rank that gets it, how). With fp32 ZeRO >= 1 DeepSpeed would skip a
    # NaN gradient norm by itself, so there only the guard is told of a NaN ("verdict") and must stop the update.
    "zero0_nan": (["deepspeed.zero_stage=0"], 3, 1, "nan"),
    "zero1": (["deepspeed.zero_stage=1"], 3, 0, "verdict"),
    "zero2_first_step": (["deepspeed.zero_stage=2", "checkpoint.save_at_end=true"], 1, 1, "verdict"),
    "zero1_bf16": (["deepspeed.zero_stage=1", "train.precision=bf16"], 2, 1, "verdict"),
    "zero3": (["deepspeed.zero_stage=3"], 2, 1, "verdict"),
    "zero3_nan": (["deepspeed.zero_stage=3"], 3, 0, "nan"),
    "pipeline": (["parallel.pipeline=2", "train.micro_batch_size=2"], 3, 1, "verdict"),  # rank 1: last stage
    "abort": (["deepspeed.zero_stage=1", "train.nonfinite=abort"], 3, 1, "nan"),
}


@pytest.fixture(scope="module")
def results(pattern_dataset, tmp_path_factory):
    return run_distributed(_many, 2, pattern_dataset, str(tmp_path_factory.mktemp("nan")), CASES)


@pytest.mark.parametrize("case", [c for c in CASES if c != "abort"])
def test_nan_on_one_rank_is_skipped_on_every_rank(results, case):
    for rank, r in enumerate(results):
        got = r[case]
        assert got["unchanged"], f"{case}: rank {rank} changed its parameters or optimizer state"
        assert not got["applied"] and "non-finite" in got["reason"]
        assert got["exit"] == 0 and got["skipped"] == 1
        assert got["steps"] == list(range(1, STEPS + 1)) and got["finite_after"]


def test_abort_policy_stops_the_job(results):
    from megatrain.resilience import ABORT_EXIT_CODE

    nan_step = CASES["abort"][1]
    for r in results:
        got = r["abort"]
        assert got["unchanged"] and got["exit"] == ABORT_EXIT_CODE
        assert "train.nonfinite=abort" in got["abort"]
        assert got["steps"] == list(range(1, nan_step))


# --------------------------------------------------------------------------- the policy alone


class _Cfg:
    nonfinite, max_nonfinite_in_a_row, spike_zscore, spike_window, max_wall_time = "skip", 3, 3.0, 5, None


def _guard(votes: list[tuple]) -> "object":
    from megatrain.resilience import StepGuard

    class Engine:
        def fp16_enabled(self):
            return False

    g = StepGuard(Engine(), _Cfg(), grad_accum=1, is_pipeline=False, device=torch.device("cpu"))
    it = iter(votes)
    g._vote = lambda: next(it)
    return g


def _vote(loss: float, bad_loss: int = 0, bad_grad: int = 0, stop: int = 0) -> tuple:
    return (bad_loss, bad_grad, 0.0 if bad_loss else loss, 1, stop, 0)


def test_skip_counts_and_aborts_after_k_in_a_row():
    g = _guard([_vote(1.0), _vote(0, bad_loss=1), _vote(0, bad_grad=1), _vote(1.0), _vote(0, 1), _vote(0, 1),
                _vote(0, 1)])
    outs = [g.decide() for _ in range(7)]
    assert [o.applied for o in outs] == [True, False, False, True, False, False, False]
    assert [bool(o.abort_reason) for o in outs] == [False] * 6 + [True]
    assert "3 bad steps in a row" in outs[-1].abort_reason
    assert g.counters.skipped == 5 and g.counters.nonfinite == 5


def test_spike_is_skipped_once_the_window_is_full_and_state_round_trips():
    losses = [2.0, 2.1, 1.9, 2.0, 2.05]
    g = _guard([_vote(x) for x in losses] + [_vote(9.0), _vote(2.0)])
    assert all(g.decide().applied for _ in losses)
    spike = g.decide()
    assert not spike.applied and "loss spike" in spike.skip_reason and g.counters.spikes == 1
    assert g.decide().applied
    state = g.state_dict()
    h = _guard([])
    h.load_state_dict(state)
    assert h.state_dict() == state and list(h.spikes.history) == losses[1:] + [2.0]


def test_stop_signal_on_any_rank_stops_every_rank():
    g = _guard([_vote(1.0, stop=1)])
    assert g.decide().stop_reason.startswith("a stop signal")
