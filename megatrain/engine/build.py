"""The model, the optimizer and the DeepSpeed engine around them (plain or pipeline)."""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from megatrain.config import Config
from megatrain.data.batch import BatchPlan
from megatrain.engine import internals
from megatrain.telemetry import ds_output
from megatrain.model.llama import Ctx, LlamaModel, head_logits, layer_parts, logits_loss
from megatrain.model.names import pipeline_parts
from megatrain.optim import build_optimizer, build_scheduler
from megatrain.parallel.state import ParallelState
from megatrain.parallelize import parallelize

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- models


def build_ctx(cfg: Config, st: ParallelState, device: torch.device) -> Ctx:
    from megatrain.parallel.random import RNGTracker

    rng = RNGTracker(device)
    rng.seed(cfg.train.seed, st.tp_rank)
    return Ctx(tp_group=st.tp_group, rng=rng, device=device, loss_chunk_tokens=cfg.train.loss_chunk_tokens,
               sequence_parallel=cfg.parallel.sequence_parallel, cp_group=st.cp_group if st.cp_size > 1 else None,
               document_positions=cfg.data.document_positions)


def _tied_head_forward(module: nn.Module, h: torch.Tensor, tp_group: Any, sequence_parallel: bool) -> torch.Tensor:
    return head_logits(module.weight, h, tp_group, sequence_parallel)


def build_pipeline_module(cfg: Config, st: ParallelState, ctx: Ctx) -> nn.Module:
    """DeepSpeed PipelineModule of the model's flat parts, stages cut by ``parallel.pipeline_partition``."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    parts = layer_parts(cfg.model)
    specs = []
    for i, part in enumerate(parts):
        if part.tie and i == len(parts) - 1:
            fwd = functools.partial(_tied_head_forward, tp_group=st.tp_group, sequence_parallel=ctx.sequence_parallel)
            specs.append(TiedLayerSpec(part.tie, part.cls, cfg.model, ctx, forward_fn=fwd, tied_weight_attr="weight"))
        elif part.tie:
            specs.append(TiedLayerSpec(part.tie, part.cls, cfg.model, ctx, tied_weight_attr="weight"))
        else:
            specs.append(LayerSpec(part.cls, cfg.model, ctx, *part.args))
    # DeepSpeed's data axis is our data x context ranks (same rank order, parallel/state.py)
    topo = PipeModelDataParallelTopology(num_pp=st.pp_size, num_mp=st.tp_size, num_dp=st.dp_size * st.cp_size)
    loss = functools.partial(logits_loss, tp_group=st.tp_group, cp_group=ctx.cp_group)
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


def pipeline_batches(batches):
    """The loader's micro-batches in DeepSpeed's pipeline form (inputs, labels); with a document layout
    the inputs are (tokens, position_ids), which the first stage passes on with the hidden states."""
    for batch in batches:
        yield batch if len(batch) == 2 else ((batch[0], batch[2]), batch[1])


@dataclass
class Built:
    engine: Any
    module: nn.Module
    plan: BatchPlan
    ds_config: dict
    is_pipeline: bool
    ctx: Ctx


def _prepare_comm_ops(world_size: int, local_world_size: int) -> None:
    """Before ``deepspeed.init_distributed``: its shared-memory all-reduce helps only several
    processes on one host, so where one process per host runs it is neither built nor loaded."""
    if local_world_size <= 1 or world_size <= 1:
        internals.disable_op(ds_output.SHM_OP)
    elif internals.op_compatible(ds_output.SHM_OP):
        ds_output.announce_op_build(ds_output.SHM_OP, "shared-memory all-reduce between the processes of one host")


def build_engine(cfg: Config, st: ParallelState, device: torch.device, plan: BatchPlan, ds_config: dict) -> Built:
    """Model, optimizer, schedule and the DeepSpeed engine (ParallelState as ``mpu`` unless pipelined).

    ``plan`` and ``ds_config`` are the run's, made once at start-up (:func:`plan_batch`,
    :func:`build_ds_config`) so that every check on them has already run before any data is read."""
    import deepspeed

    from megatrain.model import kernels

    mode = kernels.configure_kernels(cfg.train.fused_kernels,  # before any module exists
                                     document_attention=cfg.train.document_attention if cfg.data.document_mask else None)
    internals.check_version()
    # Wrap the existing process group as DeepSpeed's comm backend; PipelineModule needs it already.
    _prepare_comm_ops(st.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", st.world_size)))
    with ds_output.deepspeed_prints_to_debug(log):  # "... built successfully"
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
