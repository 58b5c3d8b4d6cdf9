"""Every use of DeepSpeed's private internals, in one place.

Checked against DeepSpeed 0.19.8 (``CHECKED_VERSION``). Each function names the attribute it
relies on, so that a DeepSpeed upgrade is reviewed here and nowhere else. What is used:

- the optimizer wrapper chain (ZeRO-1/2/3, the bf16 and fp16 optimizers wrap a torch optimizer
  in ``.optimizer``; ZeRO-3's partial offload adds ``backup_optimizer``);
- the lazily linked Adam-state views of ZeRO-1/2 and the bf16 optimizer
  (``_hp_optimizer_states_linked``, ``_lazy_init_hp_params_optimizer_state``);
- ZeRO-3's flat fp32 partitions (``_z3_optimizer``, ``_get_fp32_opt_state_partition``,
  ``_get_param_partition_rank``) and the ZeRO-1/2 flat groups;
- the engine's optimizer-step entry point (``_take_model_step``, ``_step_applied``) that the step
  guard gates, and the pipeline engine's ``_INSTRUCTION_MAP`` that pipeline timing wraps;
- the data classes DeepSpeed pickles into its checkpoint files;
- the table of ops usable on this machine (``deepspeed.ops.__compatible_ops__``), where an op the
  run does not need (the shared-memory all-reduce of a single process) is marked unavailable.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Optional

import torch

log = logging.getLogger(__name__)

CHECKED_VERSION = "0.19.8"


def disable_op(op_name: str) -> None:
    """Make DeepSpeed treat ``op_name`` as unavailable here, so that it is neither compiled nor loaded:
    the comm backend checks this table before building its shared-memory op (and falls back to plain
    torch.distributed, as on a platform without it)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[op_name] = False


def clear_pipeline_loss_total(engine: Any) -> None:
    """Empty the pipeline engine's running ``total_loss``. ``train_batch`` clears it when it starts but
    ``eval_batch`` does not, so an ``eval_batch(compute_loss=False)`` after training adds its logits
    to the last training loss (a shape error); inference for text samples clears it around the call."""
    engine.total_loss = None


def op_compatible(op_name: str) -> bool:
    import deepspeed.ops

    return bool(deepspeed.ops.__compatible_ops__.get(op_name))


def check_version() -> None:
    """Warn once when DeepSpeed differs from the version these internals were checked against."""
    import deepspeed

    if deepspeed.__version__.split("+")[0] != CHECKED_VERSION:
        log.warning("DeepSpeed %s: megatrain's use of DeepSpeed internals was checked against %s "
                    "(megatrain/engine/internals.py); checkpoints and skipped steps are tested there",
                    deepspeed.__version__, CHECKED_VERSION)


# --------------------------------------------------------------------------- the optimizer chain


def optimizer_chain(opt: Any) -> list:
    """DeepSpeed's optimizer wrappers from the outside in, ending with the torch optimizer."""
    chain = [opt]
    while hasattr(chain[-1], "optimizer") and chain[-1].optimizer is not chain[-1]:
        chain.append(chain[-1].optimizer)
    return chain


def base_optimizer(opt: Any) -> Any:
    """The torch optimizer inside DeepSpeed's wrappers."""
    return optimizer_chain(opt)[-1]


def update_optimizers(opt: Any) -> list:
    """The torch optimizers that apply updates: the innermost one, plus ZeRO-3's ``backup_optimizer``
    (partial offload steps GPU sub-groups with it)."""
    found = [getattr(o, "backup_optimizer") for o in optimizer_chain(opt)[:-1]
             if getattr(o, "backup_optimizer", None) is not None]
    return found + [base_optimizer(opt)]


def has_state(opt: Any) -> bool:
    return any(len(o.state) > 0 for o in update_optimizers(opt) if hasattr(o, "state"))


def _no_update(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def updates_disabled(opt: Any) -> Iterator[None]:
    """Within the block, the optimizers under ``opt`` do not change any parameter or state."""
    inner = update_optimizers(opt)
    for o in inner:
        o.step = _no_update  # an instance attribute shadows the class's step for this object only
    try:
        yield
    finally:
        for o in inner:
            o.__dict__.pop("step", None)


def relink_lazy_state(opt: Any, now: bool) -> None:
    """ZeRO-1/2 and the bf16 optimizer link per-parameter views of the Adam state lazily, after the
    first step. Mark them unlinked (a skipped first step must not freeze empty links), and with
    ``now`` link them at once (to read or write the state through the views)."""
    for o in optimizer_chain(opt):
        if hasattr(o, "_hp_optimizer_states_linked"):
            o._hp_optimizer_states_linked = False
            if now and hasattr(o, "_lazy_init_hp_params_optimizer_state"):
                o._lazy_init_hp_params_optimizer_state()


def optimizer_step_count(opt: Any) -> int:
    """AdamW's step count (updates applied), 0 before the first update."""
    for st in base_optimizer(opt).state.values():
        if "step" in st:
            s = st["step"]
            return int(s.item() if torch.is_tensor(s) else s)
    return 0


# --------------------------------------------------------------------------- per-parameter optimizer state


def full_state(p: torch.nn.Parameter, opt: Any, key: Optional[str]) -> torch.Tensor:
    """This TP/PP shard's full (all DP ranks) fp32 master (key None) or Adam state ``key``, on the CPU;
    collective over DP under ZeRO."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        t = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    else:  # ZeRO-0 in fp32: the torch optimizer holds the parameters themselves
        t = p.detach() if key is None else base_optimizer(opt).state[p][key]
    return t.detach().float().cpu().clone()


def full_state_view(p: torch.nn.Parameter, opt: Any, key: Optional[str]) -> torch.Tensor:
    """As :func:`full_state`, but on the tensor's own device and without the copy: the result may alias
    the live state (ZeRO-0 in fp32), so the caller copies it before the next optimizer step."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    mapping = getattr(p, "_hp_mapping", None)
    if mapping is not None and not hasattr(p, "ds_id") and _dp_size(p) == 1 \
            and mapping.lp_fragment_address.numel == p.numel():
        # One DP rank holds the whole fp32 tensor: its fragment is a view of it. (DeepSpeed's gather would
        # fill a zeroed full-size buffer and all-reduce it over a group of one: two more copies.)
        return mapping.get_hp_fragment(key).detach().view(p.shape)
    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        t = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    else:
        t = p.detach() if key is None else base_optimizer(opt).state[p][key]
    return t.detach().float()


def _dp_size(p: torch.nn.Parameter) -> int:
    import torch.distributed as dist

    group = getattr(p, "_dp_group", None)
    return dist.get_world_size(group) if dist.is_initialized() else 1


_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis", "scale_factor", "scale_window",
                  "min_scale", "delayed_shift", "consecutive_hysteresis")


def _loss_scalers(opt: Any) -> list:
    return [o.loss_scaler for o in optimizer_chain(opt) if getattr(o, "loss_scaler", None) is not None]


def loss_scaler_state(opt: Any) -> Optional[dict]:
    """fp16's loss scaler (``loss_scaler`` of DeepSpeed's fp16 / ZeRO optimizers) as plain numbers, or None
    when there is none (fp32, bf16). A checkpoint keeps it so a resume continues with the same scale."""
    for s in _loss_scalers(opt):
        out = {}
        for k in _SCALER_FIELDS:
            v = getattr(s, k, None)
            if torch.is_tensor(v):
                v = v.item()
            if isinstance(v, (bool, int, float)):
                out[k] = v
        return out or None
    return None


def set_loss_scaler_state(opt: Any, state: Optional[dict]) -> None:
    """Restore what :func:`loss_scaler_state` recorded (tensor-valued fields keep their device)."""
    if not state:
        return
    for s in _loss_scalers(opt):
        for k, v in state.items():
            old = getattr(s, k, None)
            if torch.is_tensor(old):
                old.fill_(v)
            elif k in _SCALER_FIELDS and hasattr(s, k):
                setattr(s, k, v)


def set_full_state(p: torch.nn.Parameter, opt: Any, key: Optional[str], value: torch.Tensor) -> None:
    """Write this TP/PP shard's full fp32 master (key None) or Adam state into DeepSpeed's partitions."""
    if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition of the flat fp32 buffer (last one may be padded)
        z3 = p._z3_optimizer
        part, _ = z3._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
        flat = value.flatten().to(part.device, part.dtype)
        start = part.numel() * z3._get_param_partition_rank(p)
        n = max(0, min(part.numel(), flat.numel() - start))
        part.data[:n].copy_(flat[start:start + n])
    elif hasattr(p, "_hp_mapping"):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        v = value.to(p.device, torch.float32)
        safe_set_full_fp32_param(p, v) if key is None else safe_set_full_optimizer_state(p, v, key)
    elif key is None:
        with torch.no_grad():
            p.copy_(value.to(p.device, p.dtype))
    else:
        base_optimizer(opt).state[p][key].copy_(value.to(p.device))


def materialize_adam_state(opt: Any, step: int) -> None:
    """Create AdamW state (zeros, ``step``) for every tensor the optimizer updates, as its first step would."""
    base = base_optimizer(opt)
    flats = None
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        if getattr(opt, attr, None) is not None:
            flats = list(getattr(opt, attr))
            break
    targets = flats if flats is not None else [p for g in base.param_groups for p in g["params"]]
    torch_adam = isinstance(base, (torch.optim.Adam, torch.optim.AdamW))
    for t in targets:
        base.state[t] = {"step": torch.tensor(float(step)) if torch_adam else step,
                         "exp_avg": torch.zeros_like(t, memory_format=torch.preserve_format),
                         "exp_avg_sq": torch.zeros_like(t, memory_format=torch.preserve_format)}
    for g in base.param_groups:
        if "step" in g:  # DeepSpeed's fused Adam counts steps per group
            g["step"] = step


# --------------------------------------------------------------------------- the engine's step and counters


def hook_take_model_step(engine: Any, gated: Callable[[Callable, Optional[dict]], None]) -> Callable[[], None]:
    """Route ``engine._take_model_step`` (which the plain engine calls at the accumulation boundary of
    ``step()`` and the pipeline engine from its OptimizerStep instruction, once per optimizer step on
    every rank) through ``gated(original, lr_kwargs)``. Returns a function that undoes it."""
    original = getattr(engine, "_take_model_step", None)
    if not callable(original):
        raise RuntimeError(f"this DeepSpeed ({type(engine).__name__}) has no _take_model_step(): the step guard "
                           f"cannot see the optimizer step; megatrain is checked against deepspeed {CHECKED_VERSION}")
    # An instance attribute shadows the method for this engine only; both engines call it by name.
    engine._take_model_step = lambda lr_kwargs=None: gated(original, lr_kwargs)
    return lambda: engine.__dict__.pop("_take_model_step", None)


def mark_step_skipped(engine: Any) -> None:
    """Record a step whose update did not happen the way DeepSpeed records its own overflow skips."""
    engine._step_applied = False
    engine.skipped_steps += 1


def set_progress_counters(engine: Any, step: int, samples: int, skipped: int) -> None:
    """The engine's step/sample/skip counters, as after ``step`` optimizer steps."""
    engine.global_steps, engine.global_samples, engine.skipped_steps = step, samples, skipped


def wrap_pipeline_instructions(engine: Any, wrap: Callable[[str, Callable], Callable]) -> None:
    """Replace each instruction handler of a PipelineEngine by ``wrap(instruction class name, handler)``.
    The engine looks handlers up in ``self._INSTRUCTION_MAP`` on every use: an instance copy takes
    precedence over the class's map and leaves other engines untouched."""
    engine._INSTRUCTION_MAP = {cls: wrap(cls.__name__, fn) for cls, fn in type(engine)._INSTRUCTION_MAP.items()}


# --------------------------------------------------------------------------- checkpoint files


def checkpoint_safe_globals() -> list:
    """The classes DeepSpeed pickles into its checkpoints: plain data holders, safe to rebuild."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]
