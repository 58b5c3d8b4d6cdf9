"""megatrain config + batch plan -> the DeepSpeed config dict. The only place one is built.

Templates in ``ds_configs/`` hold engine settings (ZeRO stage and buckets, offload, pipeline
options); batch sizes, precision, clipping and the optimizer come from megatrain's config, and a
template that says otherwise is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatrain.config import Config, ConfigError
from megatrain.data.batch import BatchPlan

TEMPLATE_DIR = Path(__file__).resolve().parent.parent.parent / "ds_configs"
# Keys megatrain owns: a template that sets them contradicts the run config.
_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "optimizer", "scheduler", "bf16", "fp16",
               # DeepSpeed's other spellings of precision: "bfloat16" is bf16's alias, the others cast the forward
               "bfloat16", "torch_autocast", "amp")


def load_template(cfg: Config) -> tuple[str, dict]:
    """(name, dict) of the engine template: explicit, or chosen from zero stage, offload and pipeline."""
    ds = cfg.deepspeed
    name = ds.template
    if name is None:
        if cfg.parallel.pipeline > 1:
            name = "pipeline"
        elif ds.offload != "none":
            name = "zero3_offload" if ds.zero_stage == 3 else "zero2_offload"
        else:
            name = f"zero{ds.zero_stage}"
    path = Path(name)
    if not path.suffix:
        path = TEMPLATE_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TEMPLATE_DIR.glob("*.json")))
        raise ConfigError(f"deepspeed.template={name!r}: no such template file {path} (shipped: {known})")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"deepspeed.template {path}: not valid JSON: {e}") from None
    if not isinstance(loaded, dict) or not isinstance(loaded.get("zero_optimization", {}), dict):
        raise ConfigError(f"deepspeed.template {path}: the top level, and zero_optimization if present, must be "
                          f"JSON objects (DeepSpeed's config layout)")
    return str(path), loaded


def build_ds_config(cfg: Config, plan: BatchPlan) -> dict:
    """The complete DeepSpeed config dict for this run."""
    name, ds = load_template(cfg)
    for key in _OWNED_KEYS:
        if key in ds:
            raise ConfigError(f"deepspeed template {name} sets {key!r}, which megatrain derives from its own config "
                              f"(train.*, optimizer.*); remove it from the template")
    zero = ds.setdefault("zero_optimization", {})
    stage = zero.setdefault("stage", cfg.deepspeed.zero_stage)
    if stage != cfg.deepspeed.zero_stage and not (cfg.parallel.pipeline > 1 and cfg.deepspeed.template is None):
        raise ConfigError(f"deepspeed template {name} has zero_optimization.stage={stage} but "
                          f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}; make them agree")
    zero["stage"] = cfg.deepspeed.zero_stage
    _apply_offload(cfg, zero, name)
    _check_zero_section(zero, name)
    t = cfg.train
    ds.update({
        # DeepSpeed's data-parallel group is data x context (parallel/state.py): to it, each context
        # rank's slice of a sample is a sample, so its batch is parallel.context times ours.
        "train_batch_size": plan.global_batch * cfg.parallel.context,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": cfg.optimizer.grad_clip,
        "steps_per_print": 1 << 30,  # megatrain prints its own line
        "wall_clock_breakdown": False,
    })
    if t.precision == "bf16" and cfg.deepspeed.zero_stage == 0:
        raise ConfigError("train.precision=bf16 with deepspeed.zero_stage=0: DeepSpeed's ZeRO-0 path keeps no fp32 "
                          "master weights for bf16 (it would accumulate and update in bf16); use "
                          "deepspeed.zero_stage=1, which is data-parallel Adam with fp32 masters and sharded state")
    if t.precision == "bf16":
        # fp32 gradient accumulation across micro-batches; bf16 sums of many micro-batches lose bits.
        ds["bf16"] = {"enabled": True}
        ds.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    if cfg.parallel.pipeline > 1:
        pipe = ds.setdefault("pipeline", {})
        pipe["activation_checkpoint_interval"] = cfg.parallel.activation_checkpoint_interval
        if cfg.parallel.sequence_parallel:
            # DeepSpeed cuts each activation sent between stages over the TP ranks and all-gathers it on
            # arrival, which assumes TP ranks hold the same activation; under SP each holds other tokens
            # (already 1/tp of the sequence, so there is nothing left to save by cutting).
            pipe["pipe_partitioned"] = pipe["grad_partitioned"] = False
    if not torch.cuda.is_available() or cfg.deepspeed.offload != "none":
        # Lets DeepSpeed drive torch's AdamW where its compiled CPU Adam is not wanted (CPU runs).
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds


def _check_zero_section(zero: dict, name: str) -> None:
    """DeepSpeed's own schema for zero_optimization, now instead of inside engine start-up."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"deepspeed template {name}: zero_optimization is not valid for DeepSpeed: {problems}") from None


def _apply_offload(cfg: Config, zero: dict, name: str) -> None:
    mode = cfg.deepspeed.offload
    has_opt, has_param = "offload_optimizer" in zero, "offload_param" in zero
    if mode == "none" and (has_opt or has_param) and cfg.deepspeed.template is not None:
        raise ConfigError(f"deepspeed template {name} offloads to CPU but deepspeed.offload=none; "
                          f"set deepspeed.offload=optimizer|all or use another template")
    if mode == "none":
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)
        return
    pin = torch.cuda.is_available()
    zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": pin})
    if mode == "all":
        zero.setdefault("offload_param", {"device": "cpu", "pin_memory": pin})
    else:
        zero.pop("offload_param", None)
