"""The training loop: steps, evaluation, text samples, logging and checkpoint cadence."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatrain import resilience as res
from megatrain.checkpoint import Checkpointer, Progress
from megatrain.config import Config
from megatrain.engine import Built, pipeline_batches
from megatrain.model.accounting import flops_per_token
from megatrain.optim import lr_at
from megatrain.parallel.state import ParallelState
from megatrain.telemetry.metrics import MetricsSink, device_peak_tflops, format_step_line, peak_memory_gib
from megatrain.telemetry.pipe_timing import PipelineTimer, format_report

log = logging.getLogger(__name__)

def finished_hint(step: int, max_steps: int) -> str:
    """What to run on a finished run: extend it (with the exact command) or evaluate it."""
    from megatrain.checkpoint.compat import extend_command

    more = extend_command(step, 2 * max_steps)
    return (f"the run is already at step {step} (train.max_steps={max_steps}): nothing to train, the checkpoint is "
            f"left as it is. To train on, raise the horizon and say how the learning rate goes on: {more} "
            f"schedule.on_extend=continue (or =rewarm); to evaluate it: {extend_command(step, max_steps)} --eval-only")


REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; slurm/train.sbatch requeues on it


class Trainer:
    def __init__(self, cfg: Config, st: ParallelState, built: Built, datasets: dict[str, Any],
                 run_dir: Path, device: torch.device, tokenizer: Any = None, fingerprints: Optional[dict] = None):
        self.cfg, self.st, self.built = cfg, st, built
        self.engine = built.engine
        self.datasets, self.tokenizer = datasets, tokenizer
        self.run_dir, self.device = run_dir, device
        self.fingerprints = fingerprints or {}
        self.step = 0
        self.consumed_samples = 0
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_len)
        self.peak = device_peak_tflops()
        self.metrics = MetricsSink(run_dir, st.rank == 0, cfg.logging.wandb_project,
                                   cfg.logging.wandb_run_name or cfg.run.name or run_dir.name, cfg.to_dict())
        self._batches: Optional[Iterator] = None
        self.history: list[dict] = []  # every logged record, for callers and tests
        self.exit_code = 0
        self.on_resumed: Optional[Callable[[], None]] = None  # called on every rank once the resume succeeded
        # Skip / abort / stop decisions taken by all ranks together at every optimizer step.
        self.guard = res.StepGuard(self.engine, cfg.train, built.plan.grad_accum, built.is_pipeline, device)
        self.pipe_timer = None
        if cfg.logging.pipeline_timing and built.is_pipeline:
            self.pipe_timer = PipelineTimer(self.engine, device, st.pp_group, st.pp_size, built.plan.grad_accum)
        self.checkpointer = Checkpointer(cfg, st, self.engine, run_dir, rng_tracker=built.ctx.rng, guard=self.guard,
                                         fingerprints=self.fingerprints, on_saved=self._saved)

    # ------------------------------------------------------------------ data

    def _train_batches(self) -> Iterator:
        from megatrain.data.loader import build_micro_batches, document_options

        return build_micro_batches(self.datasets["train"], micro_batch_size=self.built.plan.micro_batch,
                                   global_batch_size=self.built.plan.global_batch, dp_rank=self.st.dp_rank,
                                   dp_size=self.st.dp_size, consumed_samples=self.consumed_samples,
                                   num_workers=self.cfg.data.num_workers, context=(self.st.cp_rank, self.st.cp_size),
                                   num_micro_batches=self._micro_batches_left(), **document_options(self.cfg.data))

    def _micro_batches_left(self) -> int:
        """What the rest of the run reads on this rank: the prefetch stops there, inside the built split."""
        return max(0, self.cfg.train.max_steps - self.step) * self.built.plan.grad_accum

    def _eval_batches(self, split: str = "valid") -> Optional[Iterator]:
        from megatrain.data.loader import build_micro_batches, document_options

        ds = self.datasets.get(split)
        if ds is None or len(ds) == 0:
            return None
        plan = self.built.plan
        # The same leading samples of the valid split at every evaluation, so evals are comparable.
        return build_micro_batches(ds, micro_batch_size=plan.micro_batch, global_batch_size=plan.eval_batch,
                                   dp_rank=self.st.dp_rank, dp_size=plan.dp_size, consumed_samples=0,
                                   context=(self.st.cp_rank, self.st.cp_size), num_micro_batches=self.cfg.eval.steps,
                                   **document_options(self.cfg.data))

    # ------------------------------------------------------------------ steps

    def train_step(self) -> None:
        """One optimizer step. The guard's vote before the update reduces the step's loss over all ranks;
        ``self.guard.last.loss`` holds the mean afterwards, so the loop needs no reduction of its own."""
        eng = self.engine
        if self.built.is_pipeline:
            eng.train_batch(data_iter=pipeline_batches(self._batches))
            return
        for _ in range(self.built.plan.grad_accum):
            # (tokens, labels[, position_ids]): the model takes them in this order
            batch = [t.to(self.device, non_blocking=True) for t in next(self._batches)]
            loss = eng(*batch)
            self.guard.observe_loss(loss)
            eng.backward(loss)
            eng.step()

    def _dp_mean(self, x: torch.Tensor) -> float:
        """Mean over data-parallel ranks (the pipeline engine already returns it on every stage)."""
        if self.st.dp_size > 1 and not self.built.is_pipeline:
            x = x.clone()
            dist.all_reduce(x, group=self.st.dp_group)
            x /= self.st.dp_size
        return x.item()

    def _grad_norm(self) -> Optional[float]:
        g = self.engine.get_global_grad_norm()
        if g is None:
            return None
        return float(g.item() if torch.is_tensor(g) else g)

    # ------------------------------------------------------------------ the loop

    def train(self) -> int:
        """Resume, run to train.max_steps, save. Returns 0, REQUEUE_EXIT_CODE (stopped by a signal or
        train.max_wall_time, after saving) or resilience.ABORT_EXIT_CODE (diverged, nothing saved)."""
        t = self.cfg.train
        res.apply_determinism(t.deterministic)
        self.guard.install()
        try:
            with res.Watchdog(self.cfg.distributed.timeout_s, self.st.rank) as wd, res.StopSignals() as signals:
                self.guard.signals = signals
                if t.max_wall_time:
                    self.guard.wall_deadline = time.time() + t.max_wall_time
                with wd.phase("resume from a checkpoint", factor=6):
                    progress = self.checkpointer.resume()
                self.step, self.consumed_samples = progress.step, progress.consumed_samples
                if self.on_resumed is not None:  # e.g. writing config.yaml: only once the resume checks passed
                    self.on_resumed()
                if self.cfg.eval.only:
                    return self._eval_only(progress)
                if self.step >= t.max_steps:
                    log.info(finished_hint(self.step, t.max_steps))
                    return 0
                try:
                    return self._loop(wd, signals)
                finally:  # the write in flight ends before exit, with the signal handlers still ours: a
                    self.checkpointer.close()  # second Ctrl-C while it waits still stops at once
        finally:
            self.checkpointer.close()  # a no-op after the one above; for errors before the loop
            self.guard.remove()
            self.metrics.close()
            if self._batches is not None:  # stop the prefetch thread before the interpreter shuts down
                self._batches.close()

    def _loop(self, wd: res.Watchdog, signals: res.StopSignals) -> int:
        cfg, t = self.cfg, self.cfg.train
        self._batches = self._train_batches()
        tokens_per_step = self.built.plan.global_batch * t.seq_len
        log.info("training from step %d to %d (%d samples consumed)", self.step, t.max_steps, self.consumed_samples)
        start = last = time.time()
        loss_sum, n_loss, n_acc, steps_at_start = 0.0, 0, 0, self.step
        while self.step < t.max_steps:
            began = time.time()
            # The first step after a (re)start also builds kernels and caches: give it more time.
            with wd.phase(f"train step {self.step + 1}", factor=3 if self.step == steps_at_start else 1):
                self.train_step()
            self.guard.slowest_step_s = max(self.guard.slowest_step_s, time.time() - began)
            self.checkpointer.poll()
            out = self.guard.last
            self.step += 1
            self.consumed_samples += self.built.plan.global_batch
            if out.abort_reason:
                log.error("step %d: stopping the run: %s. Nothing was saved after the last checkpoint; resume from "
                          "it with a lower learning rate or other data", self.step, out.abort_reason)
                return res.ABORT_EXIT_CODE
            if not out.applied:
                log.warning("step %d: update skipped on every rank: %s", self.step, out.skip_reason)
            if out.loss is not None:  # None: not finite (the step was skipped and is counted as such)
                loss_sum, n_loss = loss_sum + out.loss, n_loss + 1
            n_acc += 1
            if self.step % cfg.logging.interval == 0 or self.step == t.max_steps:
                now = time.time()
                self._log_step(loss_sum / n_loss if n_loss else float("nan"), n_acc * tokens_per_step / (now - last),
                               now - start, (now - start) / (self.step - steps_at_start) * (t.max_steps - self.step))
                loss_sum, n_loss, n_acc, last = 0.0, 0, 0, time.time()
            saved = self._periodic(wd)
            if out.stop_reason and self.step < t.max_steps:
                if signals.received:
                    log.warning("rank %d received %s", self.st.rank, signals.received)
                log.warning("stopping after step %d: %s; saving, then exiting with code %d (requeue)", self.step,
                            out.stop_reason, REQUEUE_EXIT_CODE)
                if not saved:
                    self._save(wd)
                return REQUEUE_EXIT_CODE
        # The checkpoint first: evaluation and samples are optional and must never cost it.
        if cfg.checkpoint.save_at_end and self.step > steps_at_start:
            self._save(wd)
            self.checkpointer.finish()  # a final checkpoint that failed in the background fails the run
        with wd.phase("final evaluation", factor=3):
            self._optional("final evaluation", self.evaluate)
            self._optional("final text samples", self.sample)
        log.info("done: %d steps, %s tokens in %.0f s", self.step,
                 f"{self.consumed_samples * t.seq_len:,}", time.time() - start)
        return 0

    def _periodic(self, wd: res.Watchdog) -> bool:
        """Evaluation, samples and the checkpoint due after this step (not the last); returns whether it saved."""
        cfg, s = self.cfg, self.step
        if s >= cfg.train.max_steps:
            return False
        saved = bool(cfg.checkpoint.interval and s % cfg.checkpoint.interval == 0)
        if saved:  # before the optional work below, which must never cost a checkpoint
            self._save(wd)
        if cfg.eval.interval and s % cfg.eval.interval == 0:
            with wd.phase(f"evaluation at step {s}", factor=3):
                self._optional(f"evaluation at step {s}", self.evaluate)
        if cfg.eval.sample_interval and s % cfg.eval.sample_interval == 0:
            with wd.phase(f"text samples at step {s}", factor=3):
                self._optional(f"text samples at step {s}", self.sample)
        return saved

    def _optional(self, what: str, fn) -> None:
        """Run optional work (evaluation, samples); a failure is logged and training goes on. A failed collective
        is not optional: the other ranks would be left waiting, so it ends the run as before."""
        try:
            fn()
        except res.DistributedError:
            raise
        except Exception as e:  # noqa: BLE001 - anything optional: decode errors, metrics I/O, a wandb hiccup
            log.error("%s failed (%s: %s); training continues, checkpoints are not affected", what,
                      type(e).__name__, e)

    def _save(self, wd: res.Watchdog) -> None:
        with wd.phase(f"checkpoint save at step {self.step}", factor=6):  # large checkpoints take long
            self.checkpointer.save(Progress(self.step, self.consumed_samples))

    def _saved(self, rec: dict) -> None:
        """A save ended (rank 0 logged it): its times go to metrics.jsonl; the stop-in-time estimate
        uses the whole write (a stop's save must end before the job is killed)."""
        self.guard.slowest_save_s = max(self.guard.slowest_save_s, rec.get("save_total_s") or 0.0)
        self.metrics.write(rec)
        self.history.append(rec)

    def _log_step(self, loss: float, tok_s: float, elapsed: float, eta: float) -> None:
        tflops = self.flops_per_token * tok_s / 1e12 / self.st.world_size
        rec = {"step": self.step, "loss": loss, "ppl": math.exp(min(loss, 50.0)),
               "lr": lr_at(self.step - 1, self.cfg.optimizer, self.cfg.schedule, self.cfg.train.max_steps),
               "grad_norm": self._grad_norm(), "tokens": self.consumed_samples * self.cfg.train.seq_len,
               "tokens_per_s": tok_s, "tflops": tflops, "mfu": tflops / self.peak if self.peak else None,
               "mem_gib": peak_memory_gib()}
        if self.guard.counters.skipped:
            rec["skipped"] = self.guard.counters.skipped
        log.info(format_step_line(rec, self.cfg.train.max_steps, elapsed, eta))
        if self.pipe_timer is not None:  # collective over the pipeline group: every rank logs at this step
            rec.update(self.pipe_timer.report())
            log.info(format_report(rec))
        self.metrics.write(rec)
        self.history.append(rec)

    # ------------------------------------------------------------------ evaluation and samples

    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> Optional[float]:
        """Mean loss over the first eval.steps micro-batches of ``split`` (a key of the datasets)."""
        batches = self._eval_batches(split)
        if batches is None or self.cfg.eval.steps <= 0:
            return None
        eng = self.engine
        eng.eval()
        try:
            if self.built.is_pipeline:
                loss = eng.eval_batch(data_iter=pipeline_batches(batches),
                                      num_micro_batches=self.cfg.eval.steps).float()
            else:
                total = torch.zeros((), device=self.device)
                for _ in range(self.cfg.eval.steps):
                    total += eng(*[t.to(self.device) for t in next(batches)]).float()
                loss = total / self.cfg.eval.steps
        finally:
            eng.train()
            batches.close()  # its prefetch thread must not outlive the evaluation
        value = self._dp_mean(loss)
        if split != "valid" or self.cfg.eval.only:  # eval-only reports: not points of the training curve
            rec = {"step": self.step, "eval_only": True, "split": split, "split_loss": value,
                   "split_ppl": math.exp(min(value, 50.0))}
            log.info("eval-only step %d | %s | loss %.4f | ppl %.2f", self.step, split, value, rec["split_ppl"])
        else:
            rec = {"step": self.step, "eval_loss": value, "eval_ppl": math.exp(min(value, 50.0))}
            log.info("eval step %d | loss %.4f | ppl %.1f", self.step, value, rec["eval_ppl"])
        self.metrics.write(rec)
        self.history.append(rec)
        return value

    def _eval_only(self, progress: Any) -> int:
        """eval.only: loss and perplexity of the resumed weights on valid, test and every eval.datasets prefix."""
        from megatrain.config import ConfigError

        if self.step == 0:
            raise ConfigError(f"eval.only: no checkpoint to evaluate under {self.run_dir / 'checkpoints'} "
                              f"(train.resume={self.cfg.train.resume}); point run.dir at a run, or train.resume at "
                              f"a checkpoint")
        splits = [s for s in ("valid", "test") if s in self.datasets]
        splits += [k for k in self.datasets if k.startswith("eval:")]
        if not splits:
            raise ConfigError("eval.only: nothing to evaluate: data.split gives the valid and test splits no weight "
                              "and eval.datasets is empty")
        for split in splits:
            self.evaluate(split)
        log.info("evaluated step %d on %d dataset(s): %s (written to %s)", self.step, len(splits),
                 ", ".join(splits), self.run_dir / "metrics.jsonl")
        return 0

    @torch.no_grad()
    def sample(self) -> list[str]:
        """Generate from the configured prompts on every rank in lockstep (TP, PP and ZeRO-3 need all ranks)."""
        if self.tokenizer is None or not self.cfg.eval.prompts or self.cfg.eval.sample_tokens <= 0:
            return []
        if self.cfg.parallel.sequence_parallel or self.st.cp_size > 1:
            log.info("text samples are skipped under sequence/context parallelism (a prompt's length is no multiple "
                     "of the split; evaluation loss still runs)")
            return []
        from megatrain.samples import sample_texts

        outs = sample_texts(self.built, self.st, self.cfg, self.tokenizer, self.device, self.cfg.train.seed + self.step)
        for text in outs:
            log.info("sample @ step %d: %r", self.step, text)
        rec = {"step": self.step, "samples": outs}
        self.metrics.write(rec)
        self.history.append(rec)
        return outs
