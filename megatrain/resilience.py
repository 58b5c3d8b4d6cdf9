"""Bad steps, preemption and hangs: the decisions every rank must take together.

- :class:`StepGuard` sits between the last backward pass of a step and the optimizer update.
  One small all-reduce over the whole world carries each rank's view: is its loss finite, are
  its gradients finite, what is its loss, did it receive SIGTERM/SIGUSR1, is the wall-time
  budget nearly spent. Every rank then takes the same decision: apply the update or skip it
  (``train.nonfinite``, loss spikes), stop after this step or go on. A skipped update is
  skipped on every rank, so replicas never diverge.
- :class:`StopSignals` turns SIGTERM / SIGUSR1 into a flag; the guard turns the flag into a
  job-wide stop at the next step boundary (every rank saves the same step, then the job exits
  with ``REQUEUE_EXIT_CODE``).
- :class:`Watchdog` names the phase each rank is in (train step N, evaluation, checkpoint
  save, ...). A collective that fails or times out is re-raised as :class:`DistributedError`
  naming the phase; a rank that stays in one phase past ``distributed.timeout_s`` (a hang
  outside any timed collective) is ended with ``HANG_EXIT_CODE`` and a message naming it.

How a skip works with DeepSpeed (ZeRO 0-3, fp32/bf16, the pipeline engine): the guard shadows
``engine._take_model_step`` on the engine instance, which both the plain engine (at the
gradient-accumulation boundary of ``engine.step()``) and the pipeline engine (its
``OptimizerStep`` instruction) call exactly once per optimizer step on every rank. To skip,
the torch optimizer *inside* DeepSpeed's wrappers gets a no-op ``step`` for that one call:
DeepSpeed still runs all of its own bookkeeping (gradient norm, freeing and zeroing the
reduced gradient partitions, ZeRO's micro-step counters, copying the unchanged fp32 masters
back to the low-precision weights, ``global_steps``), only the update itself does not happen.
AdamW's ``step`` count and moments are untouched, so a skipped step leaves no trace. The
learning-rate schedule still advances: the schedule is a function of the step number, as the
log line shows (DeepSpeed's own fp16-overflow skips would not advance it; the guard advances
it then too, so the rule holds for every kind of skip).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatrain.engine import internals

log = logging.getLogger(__name__)

ABORT_EXIT_CODE = 3  # the run diverged (train.nonfinite=abort, or too many bad steps in a row)
HANG_EXIT_CODE = 124  # like timeout(1): a rank made no progress within distributed.timeout_s
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")  # what Slurm sends before a time limit / preemption
# Words in the errors gloo and NCCL raise when a peer is stuck or gone.
_COMM_FAILURE_WORDS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                       "nccl error", "peer", "socket", "closed by remote")


class DistributedError(RuntimeError):
    """A collective failed or timed out; the message names the phase and the rank."""


# --------------------------------------------------------------------------- determinism


def apply_determinism(enabled: bool) -> None:
    """``train.deterministic``: deterministic kernels, so that a resumed run repeats the loss curve bit for bit.

    cuBLAS needs its workspace fixed before the first matmul creates a handle, hence the variable is
    set here, before training, unless the user already chose a value."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    # Deterministic mode would also fill every torch.empty with NaN (a debugging aid): DeepSpeed allocates
    # multi-GB communication buckets that way, which costs seconds and gigabytes for nothing.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


# --------------------------------------------------------------------------- signals


class StopSignals:
    """SIGTERM / SIGUSR1 set :attr:`received` (the signal's name); nothing else happens in the handler.

    Use as a context manager around the loop; the previous handlers come back on exit. Outside the
    main thread (where Python cannot install handlers) it logs that preemption is not caught."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        for name in STOP_SIGNALS:
            sig = getattr(signal, name)
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                log.warning("%s is not handled (training runs outside the main thread): preemption will not "
                            "save a checkpoint", name)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# --------------------------------------------------------------------------- spikes


class SpikeDetector:
    """z-score of a loss against the losses of the last ``window`` applied steps.

    Checks start once the window is full. The standard deviation is floored at 0.1% of the mean
    so that a flat loss curve does not turn every wiggle into a spike."""

    def __init__(self, zscore: float, window: int):
        self.zscore, self.window = zscore, max(2, window)
        self.history: deque[float] = deque(maxlen=self.window)

    def score(self, loss: float) -> Optional[float]:
        """z of ``loss``, or None while the window is filling (or detection is off)."""
        if self.zscore <= 0 or len(self.history) < self.window:
            return None
        mean = math.fsum(self.history) / len(self.history)
        var = math.fsum((x - mean) ** 2 for x in self.history) / (len(self.history) - 1)
        std = max(math.sqrt(var), 1e-3 * abs(mean), 1e-12)
        return (loss - mean) / std

    def is_spike(self, loss: float) -> bool:
        z = self.score(loss)
        return z is not None and z > self.zscore

    def add(self, loss: float) -> None:
        self.history.append(loss)


# --------------------------------------------------------------------------- the step guard


@dataclass
class StepOutcome:
    """What the guard decided at the last optimizer step (identical on every rank)."""

    applied: bool = True
    loss: Optional[float] = None  # mean loss over data-parallel ranks (None if not finite)
    skip_reason: Optional[str] = None  # why the update was not applied
    abort_reason: Optional[str] = None  # set: the loop must stop with ABORT_EXIT_CODE
    stop_reason: Optional[str] = None  # set: save and exit with the requeue code after this step


@dataclass
class _Counters:
    in_a_row: int = 0
    skipped: int = 0
    nonfinite: int = 0
    spikes: int = 0


class StepGuard:
    """The per-step vote and the skip/abort/stop policy (see the module docstring).

    ``engine`` is the DeepSpeed engine (plain or pipeline), ``train_cfg`` the ``train`` config
    section, ``grad_accum`` the micro-batches per step. Call :meth:`install` once, then on the plain
    engine :meth:`observe_loss` for every micro-batch before ``engine.step()``; the pipeline engine's
    losses are read from the engine itself."""

    def __init__(self, engine: Any, train_cfg: Any, grad_accum: int, is_pipeline: bool, device: torch.device):
        self.engine, self.cfg, self.grad_accum = engine, train_cfg, grad_accum
        self.is_pipeline, self.device = is_pipeline, device
        self.spikes = SpikeDetector(train_cfg.spike_zscore, train_cfg.spike_window)
        self.counters = _Counters()
        self.last = StepOutcome()
        self.signals: Optional[StopSignals] = None
        self.wall_deadline: Optional[float] = None  # time.time() by which the job must have exited
        self.slowest_step_s = 0.0
        self.slowest_save_s = 0.0
        self._loss: Optional[torch.Tensor] = None
        self._grad_sum: Optional[torch.Tensor] = None
        self._hooks: list = []
        # fp16 gradients overflow by design while the loss scale settles: DeepSpeed's scaler skips those
        # steps itself, so only the loss counts as evidence there.
        self._check_grads = not getattr(engine, "fp16_enabled", lambda: False)()
        self._unhook: Optional[Callable[[], None]] = None

    # ------------------------------------------------------------------ wiring

    def install(self) -> None:
        self._unhook = internals.hook_take_model_step(self.engine, self._gated_take_model_step)
        for p in self.engine.module.parameters():
            if p.requires_grad:
                self._hooks.append(p.register_hook(self._grad_hook))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._unhook is not None:
            self._unhook()
            self._unhook = None

    def _grad_hook(self, grad: torch.Tensor) -> None:
        if self._check_grads:
            # A sum propagates NaN/Inf and costs one reduction, not a mask the size of the gradient.
            s = grad.detach().sum(dtype=torch.float32)
            self._grad_sum = s if self._grad_sum is None else self._grad_sum + s

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Plain engine: this rank's loss of one micro-batch, before ``engine.step()``."""
        loss = loss.detach().float()
        self._loss = loss if self._loss is None else self._loss + loss

    def _local_loss_sum(self) -> Optional[torch.Tensor]:
        if not self.is_pipeline:
            return self._loss
        if not self.engine.is_last_stage() or self.engine.total_loss is None:
            return None  # only the last pipeline stage computes the loss
        return self.engine.total_loss.detach().float()

    # ------------------------------------------------------------------ the vote

    def _vote(self) -> tuple[int, int, float, int, int, int]:
        """(ranks with a non-finite loss, with non-finite gradients, sum of finite losses, ranks with a loss,
        ranks that got a stop signal, ranks past the wall-time margin) over the whole world."""
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        loss = self._local_loss_sum()
        if loss is None:
            bad_loss, loss_val, has_loss = zero, zero, zero
        else:
            finite = torch.isfinite(loss)
            bad_loss, loss_val, has_loss = (~finite).double(), torch.where(finite, loss, 0.0).double(), zero + 1
        bad_grad = zero if self._grad_sum is None else (~torch.isfinite(self._grad_sum)).double()
        stop = zero + (1.0 if self.signals is not None and self.signals.received else 0.0)
        wall = zero + (1.0 if self._wall_time_nearly_spent() else 0.0)
        vec = torch.stack([bad_loss, bad_grad, loss_val, has_loss, stop, wall])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vec)
        v = vec.tolist()
        self._loss, self._grad_sum = None, None
        return int(v[0]), int(v[1]), v[2], int(v[3]), int(v[4]), int(v[5])

    def _wall_time_nearly_spent(self) -> bool:
        if self.wall_deadline is None:
            return False
        # Room for this step, one more, and a save (as long as the slowest seen so far).
        margin = 2 * self.slowest_step_s + self.slowest_save_s
        return time.time() + margin >= self.wall_deadline

    def decide(self) -> StepOutcome:
        """Collective: every rank calls it once per optimizer step, before the update."""
        bad_loss, bad_grad, loss_sum, n_loss, n_stop, n_wall = self._vote()
        mean = loss_sum / max(1, n_loss) / self.grad_accum if not bad_loss else None
        out = StepOutcome(loss=mean)
        c = self.counters
        if bad_loss or bad_grad:
            out.skip_reason = "non-finite " + " and ".join(f"{w} on {n} rank(s)" for w, n in
                                                           (("loss", bad_loss), ("gradients", bad_grad)) if n)
            c.nonfinite += 1
        elif mean is not None and self.spikes.is_spike(mean):
            out.skip_reason = (f"loss spike: {mean:.4f} is {self.spikes.score(mean):.1f} std above the mean of the "
                               f"last {len(self.spikes.history)} steps (train.spike_zscore={self.cfg.spike_zscore:g})")
            c.spikes += 1
        if out.skip_reason:
            out.applied = False
            c.skipped += 1
            c.in_a_row += 1
            if self.cfg.nonfinite == "abort":
                out.abort_reason = f"{out.skip_reason}; train.nonfinite=abort"
            elif c.in_a_row >= self.cfg.max_nonfinite_in_a_row:
                out.abort_reason = (f"{c.in_a_row} bad steps in a row (train.max_nonfinite_in_a_row="
                                    f"{self.cfg.max_nonfinite_in_a_row}), the last: {out.skip_reason}")
        else:
            c.in_a_row = 0
            if mean is not None:
                self.spikes.add(mean)
        if n_stop:
            out.stop_reason = f"a stop signal ({'/'.join(STOP_SIGNALS)}) reached {n_stop} rank(s)"
        elif n_wall:
            out.stop_reason = f"train.max_wall_time={self.cfg.max_wall_time:g}s is nearly spent"
        self.last = out
        return out

    # ------------------------------------------------------------------ the gate

    def _gated_take_model_step(self, take_model_step: Callable, lr_kwargs: Optional[dict] = None) -> None:
        out = self.decide()
        sched = getattr(self.engine, "lr_scheduler", None)
        epoch = getattr(sched, "last_epoch", None)
        if out.applied:
            take_model_step(lr_kwargs)
            if not self.engine.was_step_applied():  # DeepSpeed skipped it by itself (fp16 overflow)
                out.applied, out.skip_reason = False, "DeepSpeed skipped the update (gradient overflow)"
        else:
            with internals.updates_disabled(self.engine.optimizer):
                take_model_step(lr_kwargs)
            if self.engine.was_step_applied():  # DeepSpeed did not see it as a skip: record it its way too
                internals.mark_step_skipped(self.engine)
            if not internals.has_state(self.engine.optimizer):
                internals.relink_lazy_state(self.engine.optimizer, now=False)  # no frozen empty links
        if sched is not None and epoch is not None and sched.last_epoch == epoch:
            with warnings.catch_warnings():  # torch warns when no optimizer step preceded it: intended here
                warnings.simplefilter("ignore")
                sched.step()  # keep the learning rate a function of the step number

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict:
        c = self.counters
        return {"in_a_row": c.in_a_row, "skipped": c.skipped, "nonfinite": c.nonfinite, "spikes": c.spikes,
                "history": list(self.spikes.history)}

    def load_state_dict(self, sd: Optional[dict]) -> None:
        if not sd:
            return
        self.counters = _Counters(int(sd.get("in_a_row", 0)), int(sd.get("skipped", 0)),
                                  int(sd.get("nonfinite", 0)), int(sd.get("spikes", 0)))
        self.spikes.history.clear()
        self.spikes.history.extend(float(x) for x in sd.get("history", []))


# --------------------------------------------------------------------------- hangs


def is_comm_failure(e: BaseException) -> bool:
    """Does ``e`` look like a collective that timed out or lost a peer (gloo or NCCL)?"""
    backend_error = getattr(dist, "DistBackendError", None)
    if backend_error is not None and isinstance(e, backend_error):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in text for w in _COMM_FAILURE_WORDS)


class Watchdog:
    """Tracks the phase this rank is in; see the module docstring.

    ``with wd:`` runs a daemon thread; ``with wd.phase("train step 7"):`` marks a phase. A phase may
    last ``timeout_s * factor`` plus a grace that lets the backend's own timeout fire first (its
    error is the more precise one); after that the rank's stacks go to stderr and it exits with
    ``HANG_EXIT_CODE``."""

    def __init__(self, timeout_s: float, rank: int, poll_s: float = 1.0):
        self.timeout_s, self.rank = float(timeout_s), rank
        self.poll_s = min(poll_s, max(0.1, self.timeout_s / 10))
        self.grace_s = max(2.0, 0.05 * self.timeout_s)
        self._phase: Optional[tuple[str, float, float]] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._keep_running = False

    def __enter__(self) -> "Watchdog":
        self._thread = threading.Thread(target=self._run, name="megatrain-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._keep_running:
            return  # a collective failed: keep watching the shutdown, which can hang on a broken group
        self._stop.set()

    @contextlib.contextmanager
    def phase(self, name: str, factor: float = 1.0) -> Iterator[None]:
        previous = self._phase
        self._phase = (name, time.monotonic(), self.timeout_s * factor + self.grace_s)
        try:
            yield
        except DistributedError:
            raise
        except Exception as e:
            if not is_comm_failure(e):
                raise
            elapsed = time.monotonic() - self._phase[1]
            self._keep_running = True
            self._phase = (f"shutting down after a failed collective in {name}", time.monotonic(),
                           self.timeout_s + self.grace_s)
            raise DistributedError(
                f"rank {self.rank}: a collective failed during {name} after {elapsed:.0f}s "
                f"(distributed.timeout_s={self.timeout_s:g}): another rank is stuck, died or was never "
                f"reached; look for the first error in the other ranks' logs. Backend error: "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        else:
            self._phase = previous

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            current = self._phase
            if current is None:
                continue
            name, since, limit = current
            if time.monotonic() - since > limit:
                self._fire(name, time.monotonic() - since)

    def _fire(self, name: str, elapsed: float) -> None:
        log.error("rank %d: no progress for %.0fs in %s (distributed.timeout_s=%g): a collective is stuck or "
                  "another rank died; exiting with code %d (stacks follow on stderr)", self.rank, elapsed, name,
                  self.timeout_s, HANG_EXIT_CODE)
        for h in logging.getLogger("megatrain").handlers:
            h.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(HANG_EXIT_CODE)
