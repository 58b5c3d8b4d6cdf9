"""Where a pipeline stage's step goes: compute, gradient reduction, the optimizer, and the bubble.

With ``logging.pipeline_timing=true`` on a pipelined run, every instruction that DeepSpeed's
PipelineEngine executes on this stage is timed: with CUDA events on a GPU (no host sync inside the
step; the events are read at log intervals) and with the wall clock on a CPU, where execution is
synchronous anyway. At each log interval the stages exchange their totals and every record gets

- ``pipe_compute_ms``: per stage, forward + backward time per step;
- ``pipe_bubble``: per stage, (step - compute - gradient reduction - optimizer) / compute, i.e. the
  time the stage spends waiting for its neighbours, receiving and sending, and loading micro-batches,
  relative to the compute it does;
- ``pipe_bubble_step``: the pipeline's bubble, (step - optimizer - slowest stage's compute) / slowest
  stage's compute, where "optimizer" is the least gradient-reduction + optimizer time of any stage (a
  stage that finishes its backward passes early waits inside the optimizer's gradient-norm all-reduce;
  that wait is bubble, not optimizer work). For balanced stages and free communication, 1F1B and GPipe
  schedules put it at (p - 1) / m (``pipe_bubble_theory``), p stages and m micro-batches per step.

Per stage, the bubble is uneven under 1F1B: the last stage idles for the first forward passes of the
stages before it, the first stage for the last backward passes, which take about twice as long.
"""

from __future__ import annotations

import time
from types import MethodType
from typing import Any, Callable

import torch
import torch.distributed as dist

from megatrain.engine import internals

# DeepSpeed instruction class name -> our category
CATEGORIES = {"ForwardPass": "forward", "BackwardPass": "backward", "ReduceGrads": "reduce",
              "ReduceTiedGrads": "reduce", "OptimizerStep": "optimizer", "LoadMicroBatch": "load",
              "SendActivation": "p2p", "RecvActivation": "p2p", "SendGrad": "p2p", "RecvGrad": "p2p"}
FIELDS = ("step", "forward", "backward", "reduce", "optimizer", "load", "p2p")


def bubble_fraction(step: float, compute: float, update: float) -> float:
    """Time outside compute and the update (gradient reduction + optimizer step), relative to compute."""
    if compute <= 0:
        return float("nan")
    return max(0.0, step - compute - update) / compute


class _Clock:
    """start() / stop() pairs summed per category: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[str, Any, Any]] = []
        self.totals = dict.fromkeys(FIELDS, 0.0)

    def start(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, category: str, began: Any) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending.append((category, began, end))
        else:
            self.totals[category] += (time.perf_counter() - began) * 1e3

    def drain(self) -> dict[str, float]:
        """Totals in ms since the last drain (waits for the GPU to reach the last event)."""
        if self.pending:
            self.pending[-1][2].synchronize()
            for category, a, b in self.pending:
                self.totals[category] += a.elapsed_time(b)
            self.pending.clear()
        out, self.totals = self.totals, dict.fromkeys(FIELDS, 0.0)
        return out


class PipelineTimer:
    """Times one PipelineEngine's instructions on this stage (see the module doc)."""

    def __init__(self, engine: Any, device: torch.device, pp_group: Any, pp_size: int, micro_batches: int):
        self.clock = _Clock(device)
        self.device, self.pp_group, self.pp_size, self.micro_batches = device, pp_group, pp_size, micro_batches
        self.steps = 0
        self.active = False  # inside train_batch (evaluation runs the same instructions; it is not timed)
        internals.wrap_pipeline_instructions(engine, lambda name, fn: self._timed(CATEGORIES.get(name, "p2p"), fn))
        train_batch = engine.train_batch

        def timed_train_batch(_engine: Any, *args: Any, **kwargs: Any) -> Any:
            began = self.clock.start()
            self.active = True
            try:
                return train_batch(*args, **kwargs)
            finally:
                self.active = False
                self.clock.stop("step", began)
                self.steps += 1

        engine.train_batch = MethodType(timed_train_batch, engine)

    def _timed(self, category: str, fn: Callable) -> Callable:
        def run(engine: Any, *args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return fn(engine, *args, **kwargs)
            began = self.clock.start()
            try:
                return fn(engine, *args, **kwargs)
            finally:
                self.clock.stop(category, began)

        return run

    def report(self) -> dict[str, Any]:
        """Per-step averages of every stage since the last report. Collective over the pipeline group."""
        totals = self.clock.drain()
        steps = max(self.steps, 1)
        self.steps = 0
        mine = torch.tensor([totals[f] / steps for f in FIELDS], dtype=torch.float64, device=self.device)
        stages = [torch.zeros_like(mine) for _ in range(self.pp_size)]
        dist.all_gather(stages, mine, group=self.pp_group)  # the config allows the timer only with PP > 1
        rows = [dict(zip(FIELDS, s.tolist())) for s in stages]
        compute = [r["forward"] + r["backward"] for r in rows]
        update = [r["reduce"] + r["optimizer"] for r in rows]
        bubble = [bubble_fraction(r["step"], c, u) for r, c, u in zip(rows, compute, update)]
        step = max(r["step"] for r in rows)
        return {"pipe_step_ms": [round(r["step"], 2) for r in rows],
                "pipe_compute_ms": [round(c, 2) for c in compute],
                "pipe_update_ms": [round(u, 2) for u in update],
                "pipe_p2p_ms": [round(r["p2p"], 2) for r in rows],
                "pipe_bubble": [round(b, 4) for b in bubble],
                "pipe_bubble_step": round(bubble_fraction(step, max(compute), min(update)), 4),
                "pipe_bubble_theory": round((self.pp_size - 1) / self.micro_batches, 4)}


def format_report(rep: dict[str, Any]) -> str:
    stages = ", ".join(f"{b:.1%}" for b in rep["pipe_bubble"])
    compute = ", ".join(f"{c:.0f}" for c in rep["pipe_compute_ms"])
    return (f"pipeline: bubble {rep['pipe_bubble_step']:.1%} (theory (p-1)/m = {rep['pipe_bubble_theory']:.1%}), "
            f"by stage {stages} | "
            f"compute ms/step by stage {compute} | step {max(rep['pipe_step_ms']):.0f} ms")
