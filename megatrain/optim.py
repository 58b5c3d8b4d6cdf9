"""AdamW parameter groups, the optimizer DeepSpeed drives, and the learning-rate schedules."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

from megatrain.config import Config, OptimizerConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay; norms, biases (every tensor of < 2 dims) do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:  # a ZeRO-3 parameter is an empty placeholder; ds_shape is its real shape
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, opt: OptimizerConfig, offload: str) -> torch.optim.Optimizer:
    """FusedAdam on GPU, DeepSpeed's CPU Adam with GPU offload, torch AdamW on CPU."""
    groups = param_groups(model, opt.weight_decay)
    kw = dict(lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
    if torch.cuda.is_available():
        from megatrain.telemetry.ds_output import announce_op_build

        if offload != "none":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            announce_op_build("cpu_adam", "Adam on the CPU for offloaded optimizer states")
            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
        from deepspeed.ops.adam import FusedAdam

        announce_op_build("fused_adam", "FusedAdam GPU kernels")
        return FusedAdam(groups, adam_w_mode=True, **kw)
    return torch.optim.AdamW(groups, **kw)


def lr_at(step: int, opt: OptimizerConfig, sch: ScheduleConfig, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then decay to min_lr."""
    peak, floor = opt.lr, opt.min_lr
    total = sch.decay_steps or max_steps
    if sch.extend_step is not None and step >= sch.extend_step:
        return _extended_lr(step, sch, peak, floor, total)
    if sch.warmup_steps and step < sch.warmup_steps:
        return peak * (step + 1) / sch.warmup_steps
    if sch.decay == "constant":
        return peak
    if sch.decay == "wsd":  # warmup, stable at peak, then linear cool-down over the last fraction
        cool = max(1, int(total * sch.wsd_decay_fraction))
        start = total - cool
        if step < start:
            return peak
        frac = min(1.0, (step - start) / cool)
        return peak - (peak - floor) * frac
    span = max(1, total - sch.warmup_steps)
    frac = min(1.0, max(0.0, (step - sch.warmup_steps) / span))
    if sch.decay == "linear":
        return peak - (peak - floor) * frac
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * frac))


def _decay_shape(frac: float, sch: ScheduleConfig) -> float:
    """The decay's fraction of (start - floor) left after ``frac`` of its span: 1 at 0, 0 at 1."""
    frac = min(1.0, max(0.0, frac))
    if sch.decay == "constant":
        return 1.0
    if sch.decay == "wsd":
        start = 1.0 - sch.wsd_decay_fraction
        return 1.0 if frac < start else 1.0 - (frac - start) / max(sch.wsd_decay_fraction, 1e-12)
    if sch.decay == "linear":
        return 1.0 - frac
    return 0.5 * (1 + math.cos(math.pi * frac))


def _extended_lr(step: int, sch: ScheduleConfig, peak: float, floor: float, total: int) -> float:
    """After an extension (``schedule.on_extend``) at step s0 = extend_step with LR v = extend_lr:

    - continue: v down to min_lr at the new end, in the decay's shape: lr(s0) = v, so no jump;
    - rewarm: v back up to the peak over warmup_steps (WSD-style re-warm), then the decay to the new end."""
    s0, v = sch.extend_step, sch.extend_lr
    if sch.extend_mode == "rewarm":
        w = sch.warmup_steps
        if step < s0 + w:
            return v + (peak - v) * (step - s0) / w
        s0, v = s0 + w, peak
    return floor + (v - floor) * _decay_shape((step - s0) / max(1, total - s0), sch)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    fn = functools.partial(_lr_factor, opt=cfg.optimizer, sch=cfg.schedule, max_steps=cfg.train.max_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def _lr_factor(step: int, opt: OptimizerConfig, sch: ScheduleConfig, max_steps: int) -> float:
    return lr_at(step, opt, sch, max_steps) / opt.lr
