"""Loading a chosen checkpoint into the engine: the canonical files (weights + AdamW state, re-cut for
this run's TP/PP/DP and ZeRO stage; bitwise at the same topology), or weights only. Checkpoints of
layout version 1 also hold DeepSpeed's own files (``ds/``): at their own topology those are loaded."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatrain.checkpoint import compat, layout, optim_state
from megatrain.checkpoint.layout import CheckpointError
from megatrain.checkpoint.parts import Progress, RunParts
from megatrain.checkpoint.rng import load_rng_file, reseed_rng, restore_rng
from megatrain.checkpoint.select import select_checkpoint, weights_only_unpickling
from megatrain.config import ConfigError
from megatrain.engine import internals
from megatrain.model.names import canonical_named_parameters

log = logging.getLogger(__name__)


def select_on_rank0(ck: RunParts) -> Optional[Path]:
    """Rank 0 chooses and verifies; every rank gets the same answer (or the same error)."""
    mode = ck.cfg.train.resume
    result: list = [None]
    if ck.st.rank == 0:
        try:
            found = select_checkpoint(mode, ck.root, ck.cfg.checkpoint.verify)
            result = [("ok", str(found) if found else None)]
        except (CheckpointError, ConfigError, OSError, ValueError) as e:  # the other ranks must hear of it too
            result = [("error", str(e) if isinstance(e, (CheckpointError, ConfigError)) else
                       f"train.resume={mode}: {type(e).__name__}: {e}")]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(result, src=0)
    status, value = result[0]
    if status == "error":
        raise CheckpointError(value)
    return Path(value) if value else None


def resume(ck: RunParts) -> Progress:
    """Load the checkpoint that ``train.resume`` names into the engine; returns the run's progress."""
    path = select_on_rank0(ck)
    if path is None:
        ck.resumed_step = 0
        return Progress(0, 0)
    meta = layout.read_meta(path)
    extended = compat.plan_extension(ck.cfg, meta, int(meta["step"]))
    compat.check_compatible(ck.cfg, ck.fingerprints, meta, path, schedule_settled=extended)
    step, here = int(meta["step"]), compat.topology_of(ck.cfg, ck.st)
    if meta.get("weights_only"):
        load_weights_only(ck, path, meta)
        how = "weights only (optimizer state starts fresh)"
    elif (path / "ds").is_dir() and compat.same_topology(meta.get("topology") or {}, here, meta):
        load_native(ck, path)  # a version-1 checkpoint at its own topology
        how = "DeepSpeed state, same topology"
    elif meta.get("portable_optimizer") and (meta.get("optimizer_step", 0) == 0
                                             or (path / optim_state.OPTIM_DIR).is_dir()):
        load_portable(ck, path, meta)
        how = "canonical state, same topology" if compat.same_topology(meta.get("topology") or {}, here, meta) \
            else f"resharded from {compat.describe(meta['topology'])} to {compat.describe(here)}"
    else:
        if "topology" not in ck.cfg.train.resume_allow_changes:
            raise ConfigError(f"checkpoint {path} was saved at {compat.describe(meta['topology'])} without portable "
                              f"optimizer state (checkpoint.portable_optimizer was off); this run is "
                              f"{compat.describe(here)}. Resume at the original topology, or accept a fresh "
                              f"optimizer with train.resume_allow_changes=[topology]")
        load_weights_only(ck, path, meta)
        how = "weights only (topology changed, no portable optimizer state)"
    if ck.guard is not None:
        ck.guard.load_state_dict(meta.get("resilience"))
    if ("schedule" in ck.cfg.train.resume_allow_changes or extended) and not ck.cfg.eval.only:
        apply_schedule(ck, step)
        _log_lr_change(ck.cfg, meta, step)
    ck.resumed_step = step
    log.info("resumed from %s: step %d, %d samples consumed (%s)", path, step, meta["consumed_samples"], how)
    return Progress(step, int(meta["consumed_samples"]))


def _rank_rng_file(ck: RunParts, path: Path) -> Path:
    return path / "rng" / f"rank{ck.st.rank:05d}.pt"


def load_native(ck: RunParts, path: Path) -> None:
    with weights_only_unpickling():
        ck.engine.load_checkpoint(str(path / "ds"), tag="state", load_module_strict=True,
                                  load_optimizer_states=True, load_lr_scheduler_states=True)
    rng_file = _rank_rng_file(ck, path)
    if not rng_file.is_file():
        raise CheckpointError(f"{rng_file}: missing; the checkpoint is incomplete, use another one")
    restore_rng(ck.rng_tracker, load_rng_file(rng_file))


def _read_weights(ck: RunParts, path: Path, params: dict) -> dict[str, torch.Tensor]:
    """This rank's canonical weights, re-cut for its TP rank (one full tensor in memory at a time)."""
    _, weights = layout.load_weights_for_rank(path, ck.st.tp_rank, ck.st.tp_size, names=list(params), verify="off")
    return weights


def load_portable(ck: RunParts, path: Path, meta: dict) -> None:
    """Weights and AdamW state from the canonical files, cut for this run's TP/PP/DP and ZeRO stage."""
    params = canonical_named_parameters(ck.engine.module, ck.cfg.model)
    weights = _read_weights(ck, path, params)
    opt, step = ck.engine.optimizer, int(meta.get("optimizer_step", 0))
    saved_masters = meta.get("dtype", "fp32") != "fp32"
    state = optim_state.read_state(path, meta, list(params), ck.st.tp_rank, ck.st.tp_size, saved_masters) \
        if step else {}
    if step:
        internals.materialize_adam_state(opt, step)
        internals.relink_lazy_state(opt, now=True)
    for name, p in params.items():
        master = state.get(f"{name}/fp32", weights[name]).float()  # the fp32 master when it was saved
        _assign(ck, p, master)
        internals.set_full_state(p, opt, None, master)
        for key in optim_state.ADAM_KEYS if step else ():
            internals.set_full_state(p, opt, key, state[f"{name}/{key}"])
    _set_progress(ck, int(meta["step"]), int(meta["consumed_samples"]), meta)
    internals.set_loss_scaler_state(opt, meta.get("loss_scaler"))
    topo = meta.get("topology") or {}
    rng_file = _rank_rng_file(ck, path)
    if (topo.get("tp"), topo.get("pp"), topo.get("dp"), topo.get("cp", 1)) == \
            (ck.st.tp_size, ck.st.pp_size, ck.st.dp_size, ck.st.cp_size) \
            and rng_file.is_file():
        restore_rng(ck.rng_tracker, load_rng_file(rng_file))
    else:
        reseed_rng(ck.rng_tracker, ck.cfg.train.seed + int(meta["step"]), ck.st.tp_rank)


def _set_progress(ck: RunParts, step: int, consumed: int, meta: dict) -> None:
    """The engine's counters and the learning rate, as after ``step`` steps."""
    eng = ck.engine
    internals.set_progress_counters(eng, step, consumed, int((meta.get("resilience") or {}).get("skipped", 0)))
    sched = eng.lr_scheduler
    if sched is not None:
        sched.last_epoch = step - 1
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore")
            sched.step()


def _log_lr_change(cfg, meta: dict, step: int) -> None:
    """Whenever a resume changes the schedule: the LR the last step ran at and the one the next step gets."""
    from megatrain.optim import lr_at

    if not meta.get("schedule") or meta["schedule"] == compat.schedule_fingerprint(cfg):
        return
    before = compat.lr_after(meta["schedule"], cfg, step)
    after = lr_at(step, cfg.optimizer, cfg.schedule, cfg.train.max_steps)
    how = {"continue": "continuing the decay from there", "rewarm": "re-warming to the peak over "
           f"{cfg.schedule.warmup_steps} steps, then decaying"}.get(cfg.schedule.extend_mode or "", "the new schedule")
    log.warning("learning rate: step %d ran at %.3g (the checkpoint's schedule); step %d gets %.3g (%s, to "
                "optimizer.min_lr=%.3g at step %d)", step, before, step + 1, after, how, cfg.optimizer.min_lr,
                cfg.schedule.decay_steps or cfg.train.max_steps)


def apply_schedule(ck: RunParts, step: int) -> None:
    """``resume_allow_changes=[schedule]``: this run's optimizer and schedule settings replace the saved ones."""
    o = ck.cfg.optimizer
    sched = ck.engine.lr_scheduler
    for g in internals.base_optimizer(ck.engine.optimizer).param_groups:
        g.update({"initial_lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps})
        if g.get("weight_decay", 0.0):
            g["weight_decay"] = o.weight_decay
    if sched is not None:
        sched.base_lrs = [o.lr] * len(sched.base_lrs)
    _set_progress(ck, step, ck.engine.global_samples, {"resilience": {"skipped": ck.engine.skipped_steps}})


def load_weights_only(ck: RunParts, path: Path, meta: dict) -> None:
    """Model weights from the canonical shards (any TP/PP); the optimizer state starts fresh, the schedule and
    counters continue at the checkpoint's step."""
    if not meta.get("weights_only"):
        log.warning("checkpoint %s: loading its weights only; the optimizer state restarts", path)
    params = canonical_named_parameters(ck.engine.module, ck.cfg.model)
    weights = _read_weights(ck, path, params)
    for name, p in params.items():  # DeepSpeed keeps its own fp32 masters: refresh them from the weights
        _assign(ck, p, weights[name])
        internals.set_full_state(p, ck.engine.optimizer, None, weights[name].float())
    _set_progress(ck, int(meta["step"]), int(meta["consumed_samples"]), meta)
    reseed_rng(ck.rng_tracker, ck.cfg.train.seed + int(meta["step"]), ck.st.tp_rank)


def _assign(ck: RunParts, p: torch.nn.Parameter, src: torch.Tensor) -> None:
    if tuple(src.shape) != tuple(getattr(p, "ds_shape", p.shape)):
        raise CheckpointError(f"checkpoint tensor shape {tuple(src.shape)} does not fit parameter of shape "
                              f"{tuple(getattr(p, 'ds_shape', p.shape))}")
    if ck.cfg.deepspeed.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():  # rank 0 of the DP group
            p.data.copy_(src.to(p.device, p.dtype))
        return
    with torch.no_grad():
        p.copy_(src.to(p.device, p.dtype))
