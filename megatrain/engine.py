"""megatrain config -> DeepSpeed config -> a DeepSpeed engine (plain or pipeline).

This is the only module that builds a DeepSpeed config. Templates in
``ds_configs/`` hold engine settings (ZeRO stage and buckets, offload,
pipeline options); batch sizes, precision, clipping and the optimizer come from
megatrain's config, and a template that says otherwise is an error.
"""

from __future__ import annotations

import functools
import json
import os
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from megatrain.config import Config, ConfigError
from megatrain.data.batch import BatchPlan
from megatrain.model.llama import Ctx, LlamaModel, head_logits, layer_parts, logits_loss
from megatrain.model.names import pipeline_parts
from megatrain.optim import build_optimizer, build_scheduler
from megatrain.parallel.state import ParallelState
from megatrain.parallelize import parallelize

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
# Keys megatrain owns: a template that sets them contradicts the run config.
_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "optimizer", "scheduler", "bf16", "fp16",
               # DeepSpeed's other spellings of precision: "bfloat16" is bf16's alias, the others cast the forward
               "bfloat16", "torch_autocast", "amp")


# --------------------------------------------------------------------------- DeepSpeed config


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
        "train_batch_size": plan.global_batch,
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


# --------------------------------------------------------------------------- models


def build_ctx(cfg: Config, st: ParallelState, device: torch.device) -> Ctx:
    from megatrain.parallel.random import RNGTracker

    rng = RNGTracker(device)
    rng.seed(cfg.train.seed, st.tp_rank)
    return Ctx(tp_group=st.tp_group, rng=rng, device=device, loss_chunk_tokens=cfg.train.loss_chunk_tokens)


def _tied_head_forward(module: nn.Module, h: torch.Tensor, tp_group: Any) -> torch.Tensor:
    return head_logits(module.weight, h, tp_group)


def build_pipeline_module(cfg: Config, st: ParallelState, ctx: Ctx) -> nn.Module:
    """DeepSpeed PipelineModule of the model's flat parts, stages cut by ``parallel.pipeline_partition``."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    parts = layer_parts(cfg.model)
    specs = []
    for i, part in enumerate(parts):
        if part.tie and i == len(parts) - 1:
            fwd = functools.partial(_tied_head_forward, tp_group=st.tp_group)
            specs.append(TiedLayerSpec(part.tie, part.cls, cfg.model, ctx, forward_fn=fwd, tied_weight_attr="weight"))
        elif part.tie:
            specs.append(TiedLayerSpec(part.tie, part.cls, cfg.model, ctx, tied_weight_attr="weight"))
        else:
            specs.append(LayerSpec(part.cls, cfg.model, ctx, *part.args))
    topo = PipeModelDataParallelTopology(num_pp=st.pp_size, num_mp=st.tp_size, num_dp=st.dp_size)
    loss = functools.partial(logits_loss, tp_group=st.tp_group)
    pipe = PipelineModule(layers=specs, topology=topo, loss_fn=loss,
                          partition_method=cfg.parallel.pipeline_partition,
                          activation_checkpoint_interval=cfg.parallel.activation_checkpoint_interval)
    for _, part, module in pipeline_parts(pipe, parts):
        module.reset_parameters(cfg.train.seed, part.name)
    return pipe


def build_partitioned_model(cfg: Config, st: ParallelState, ctx: Ctx, ds_config: dict) -> LlamaModel:
    """ZeRO-3: each parameter is cut into its data-parallel shards as soon as its module exists
    (``deepspeed.zero.Init``), on the GPU or, with ``deepspeed.offload=all``, in host memory. No rank
    ever holds the whole model, so the largest model is bounded by the memory of all ranks (and the
    host), not by one GPU's; and nothing multi-GB is built only to be cut up.

    The weights are then drawn part by part (one block gathered at a time), from the same seeded
    generators as the unpartitioned model, so every layout starts from the same weights."""
    import deepspeed

    # ``mpu`` only sizes the batch check of the config; the group must be given as well, or zero.Init
    # would cut each TP shard over every rank
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=st, data_parallel_group=st.get_data_parallel_group(),
                             mem_efficient_linear=False):
        module = LlamaModel(cfg.model, ctx)
    for key, part in module.init_parts():
        # every rank draws the same values; rank 0's are kept and re-partitioned
        with deepspeed.zero.GatheredParameters(list(part.parameters()), modifier_rank=0):
            part.reset_parameters(cfg.train.seed, key)
    return module


@dataclass
class Built:
    engine: Any
    module: nn.Module
    plan: BatchPlan
    ds_config: dict
    is_pipeline: bool
    ctx: Ctx


def build_engine(cfg: Config, st: ParallelState, device: torch.device, plan: BatchPlan, ds_config: dict) -> Built:
    """Model, optimizer, schedule and the DeepSpeed engine (ParallelState as ``mpu`` unless pipelined).

    ``plan`` and ``ds_config`` are the run's, made once at start-up (:func:`plan_batch`,
    :func:`build_ds_config`) so that every check on them has already run before any data is read."""
    import deepspeed

    from megatrain.model import kernels
    from megatrain.telemetry import ds_output

    mode = kernels.configure_kernels(cfg.train.fused_kernels)  # before any module exists
    # Wrap the existing process group as DeepSpeed's comm backend; PipelineModule needs it already.
    ds_output.prepare_comm_ops(st.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", st.world_size)))
    with ds_output.deepspeed_prints_to_debug(log):
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False)
    ctx = build_ctx(cfg, st, device)
    if st.pp_size > 1:
        module = build_pipeline_module(cfg, st, ctx).to(device)
    elif cfg.deepspeed.zero_stage == 3:
        module = build_partitioned_model(cfg, st, ctx, ds_config)
    else:
        with torch.device(device):
            module = LlamaModel(cfg.model, ctx)
        module.init_weights(cfg.train.seed)
    parallelize(module, cfg.train)
    optimizer = build_optimizer(module, cfg.optimizer, cfg.deepspeed.offload)
    scheduler = build_scheduler(optimizer, cfg)
    with ds_output.deepspeed_prints_to_debug(log):  # its memory reports ("MA ... Max_MA ...")
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            mpu=None if st.pp_size > 1 else st, dist_init_required=False)
    log.info("DeepSpeed engine: %s, ZeRO-%d, %s, %s kernels, micro-batch %d x accumulation %d x DP %d = %d "
             "samples/step", "pipeline" if st.pp_size > 1 else "plain", cfg.deepspeed.zero_stage, cfg.train.precision,
             mode,
             plan.micro_batch, plan.grad_accum, plan.dp_size, plan.global_batch)
    return Built(engine, module, plan, ds_config, st.pp_size > 1, ctx)
