"""Batch arithmetic: global batch = micro-batch x gradient accumulation x data-parallel size.

Computed once per run (``plan_batch``) and handed to the data loader, the DeepSpeed config and the
trainer, so that the three agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatrain.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class BatchPlan:
    """Samples per forward on one data-parallel rank, micro-batches per optimizer step, DP ranks."""

    micro_batch: int
    grad_accum: int
    dp_size: int

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all DP ranks."""
        return self.micro_batch * self.grad_accum * self.dp_size

    @property
    def eval_batch(self) -> int:
        """Samples per evaluation micro-step over all DP ranks (one micro-batch each, no accumulation)."""
        return self.micro_batch * self.dp_size

    def train_samples(self, steps: int) -> int:
        return steps * self.global_batch

    def eval_samples(self, steps: int) -> int:
        return max(1, steps) * self.eval_batch


def plan_batch(train: TrainConfig, dp_size: int) -> BatchPlan:
    """global batch = micro batch x gradient accumulation x DP size, or an error proposing valid values."""
    mb = train.micro_batch_size
    gb = train.global_batch_size or mb * dp_size
    if gb % (mb * dp_size):
        lo = max(mb * dp_size, (gb // (mb * dp_size)) * mb * dp_size)
        hi = lo + mb * dp_size
        mbs = [m for m in range(1, mb + 1) if gb % (m * dp_size) == 0]
        hint = f"train.micro_batch_size={mbs[-1]}" if mbs else f"a data-parallel size dividing {gb}"
        raise ConfigError(f"train.global_batch_size={gb} is not divisible by train.micro_batch_size x DP size = "
                          f"{mb} x {dp_size}; use train.global_batch_size={lo} or {hi}, or keep {gb} with {hint}")
    return BatchPlan(mb, gb // (mb * dp_size), dp_size)
