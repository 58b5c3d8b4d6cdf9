"""Every check of a config that needs only the config (and, when known, the world size): run once at
start-up, each naming the field at fault and what to do."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from megatrain.config import INT_LIMIT, Config, ConfigError, ModelConfig, ParallelConfig, TrainConfig


def _check_run_dir(run_dir: Any) -> None:
    if not isinstance(run_dir, str) or not run_dir.strip():
        raise ConfigError(f"run.dir={run_dir!r}: empty; give the run's directory (e.g. run.dir=runs/NAME), or "
                          f"run.dir=. to mean the working directory")


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Every check that needs only the config (and, when known, the world size)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    validate_model(m)  # the model section's ranges and shapes
    for f in dataclasses.fields(cfg):
        if f.name != "model":
            _check_ranges(getattr(cfg, f.name), f.name + ".")
    if cfg.optimizer.min_lr > cfg.optimizer.lr:
        raise ConfigError(f"optimizer.min_lr={cfg.optimizer.min_lr} exceeds optimizer.lr={cfg.optimizer.lr}: the "
                          f"decay ends at min_lr, so it must be <= the peak")
    bad = [x for x in cfg.eval.prompts if not isinstance(x, str)]
    if bad:
        raise ConfigError(f"eval.prompts: every prompt must be a string, got {bad!r}; quote them in YAML")
    if not all(isinstance(x, str) and x for x in cfg.eval.datasets):
        raise ConfigError(f"eval.datasets={cfg.eval.datasets!r}: a list of dataset prefixes (PATH for PATH.bin/.idx)")
    _check_partition(p.pipeline_partition)
    _check_run_dir(cfg.run.dir)
    _check_divisibility(m, p)
    validate_sequence_split(cfg)
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; raise "
                          f"model.max_seq_len (with model.rope_scaling for a long context), or use a long-context "
                          f"preset such as llama3.1-8b")
    _check_choices(cfg)
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}: must be 0, 1, 2 or 3")
    if p.pipeline > 1 and cfg.deepspeed.zero_stage > 1:
        raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} with parallel.pipeline={p.pipeline}: "
                          f"DeepSpeed's pipeline engine does not support ZeRO-2/3; use deepspeed.zero_stage=0 or 1")
    if cfg.logging.pipeline_timing and p.pipeline == 1:
        raise ConfigError("logging.pipeline_timing=true times pipeline stages, but parallel.pipeline=1; set "
                          "parallel.pipeline > 1 or drop the option")
    if cfg.deepspeed.offload == "all" and cfg.deepspeed.zero_stage != 3:
        raise ConfigError("deepspeed.offload=all offloads parameters, which needs deepspeed.zero_stage=3")
    if cfg.deepspeed.offload == "optimizer" and cfg.deepspeed.zero_stage == 0:
        raise ConfigError("deepspeed.offload=optimizer needs deepspeed.zero_stage >= 1")
    bad = [x for x in t.resume_allow_changes if x not in ("data", "tokenizer", "model", "schedule", "topology")]
    if bad:
        raise ConfigError(f"train.resume_allow_changes: unknown item(s) {bad!r}; "
                          f"allowed: data, tokenizer, model, schedule, topology")
    if cfg.data.document_mask and m.dropout > 0 and t.document_attention in ("flex", "varlen"):
        raise ConfigError(f"train.document_attention={t.document_attention} has no attention dropout, but "
                          f"model.dropout={m.dropout}; use train.document_attention=sdpa (or auto) or model.dropout=0")
    if world_size is not None:
        validate_world(cfg, world_size)


def _check_divisibility(m: ModelConfig, p: ParallelConfig) -> None:
    """Every split the TP and PP sizes make must come out whole."""
    if m.num_heads % p.tensor:
        raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by parallel.tensor={p.tensor}")
    if m.kv_heads % p.tensor:
        raise ConfigError(f"model.num_kv_heads={m.kv_heads} is not divisible by parallel.tensor={p.tensor}; "
                          f"use a tensor-parallel size that divides it")
    if m.ffn_size % p.tensor:
        raise ConfigError(f"model FFN width {m.ffn_size} is not divisible by parallel.tensor={p.tensor}")
    if m.vocab_size % p.tensor:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is not divisible by parallel.tensor={p.tensor}; "
                          f"pad the vocabulary to a multiple of it")
    if m.num_layers % p.pipeline:
        raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline={p.pipeline}")


def validate_model(m: ModelConfig) -> None:
    """The model section's own rules (ranges, head and FFN shapes), for configs that are not a whole run."""
    _check_ranges(m, "model.")
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    if m.num_kv_heads is not None and m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}")
    if m.head_dim % 2:
        raise ConfigError(f"model.hidden_size / model.num_heads = {m.head_dim} must be even for RoPE")
    if m.ffn_size <= 0:
        raise ConfigError(f"the FFN width derived from model.multiple_of={m.multiple_of} and model.ffn_dim_multiplier="
                          f"{m.ffn_dim_multiplier} is {m.ffn_size}; set model.ffn_hidden_size")


def validate_sequence_split(cfg: Config) -> None:
    """Sequence parallelism and context parallelism: what the sequence and the heads must divide into."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if p.sequence_parallel and p.tensor < 2:
        raise ConfigError(f"parallel.sequence_parallel=true needs parallel.tensor >= 2 (it is {p.tensor}): sequence "
                          f"parallelism splits the tensor-parallel group's tokens; set parallel.tensor or drop it")
    if t.seq_len % p.context:
        raise ConfigError(f"train.seq_len={t.seq_len} is not divisible by parallel.context={p.context}: each "
                          f"context rank holds an equal contiguous slice; use a multiple of {p.context}")
    if (p.sequence_parallel or p.context > 1) and m.dropout > 0:
        # The dropout streams are per TP rank (megatrain.parallel.random); with the sequence split, ranks
        # holding other tokens would repeat one mask pattern over the slices. LLaMA pretraining uses 0.
        raise ConfigError(f"model.dropout={m.dropout} with parallel.sequence_parallel / parallel.context > 1 is "
                          f"not supported (the dropout masks would repeat across sequence slices); set "
                          f"model.dropout=0")
    local = t.seq_len // p.context
    if p.sequence_parallel and local % p.tensor:
        what = f"train.seq_len / parallel.context = {local}" if p.context > 1 else f"train.seq_len={t.seq_len}"
        raise ConfigError(f"{what} is not divisible by parallel.tensor={p.tensor} (parallel.sequence_parallel "
                          f"splits it over the TP ranks); use a train.seq_len that is a multiple of "
                          f"{p.tensor * p.context}")
    if p.context == 1:
        return
    if m.num_heads % (p.tensor * p.context):
        raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by parallel.tensor x parallel.context = "
                          f"{p.tensor} x {p.context}: context parallelism gives each rank whole query heads; "
                          f"choose sizes whose product divides the head count")
    kv_local = m.kv_heads // p.tensor
    if kv_local % p.context and p.context % kv_local:
        raise ConfigError(f"model.num_kv_heads / parallel.tensor = {kv_local} KV heads per TP rank and "
                          f"parallel.context={p.context}: one must divide the other (KV heads are split over the "
                          f"context ranks when divisible, replicated when fewer); change parallel.context")


def validate_world(cfg: Config, world_size: int) -> None:
    p = cfg.parallel
    n = p.tensor * p.context * p.pipeline
    if world_size % n:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor x parallel.context x "
                          f"parallel.pipeline = {p.tensor} x {p.context} x {p.pipeline}; launch a multiple of {n} "
                          f"processes")


def _check_ranges(section: Any, prefix: str = "") -> None:
    """Every numeric field against the Range it declares; floats must also be finite."""
    for f in dataclasses.fields(section):
        v, key = getattr(section, f.name), prefix + f.name
        if dataclasses.is_dataclass(v):
            _check_ranges(v, key + ".")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            allowed = f.metadata.get("range")
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key}={v}: must be a finite number" + (f" {allowed}" if allowed else ""))
            if allowed is not None and not allowed.holds(v):
                raise ConfigError(f"{key}={v!r}: must be {allowed}")
            if isinstance(v, int) and abs(v) > INT_LIMIT:
                raise ConfigError(f"{key}={v!r}: too large (at most 2**53)")


def _check_partition(spec: str) -> None:
    """DeepSpeed's partition methods: parameters, uniform, type:<regex of layer class names>."""
    import re

    key = "parallel.pipeline_partition"
    if spec.lower() in ("parameters", "uniform"):
        return
    if not spec.lower().startswith("type:"):
        raise ConfigError(f"{key}={spec!r}: choose parameters, uniform or type:<regex of layer class names>")
    try:
        re.compile(spec[len("type:"):], re.IGNORECASE)
    except re.error as e:
        raise ConfigError(f"{key}={spec!r}: the regex after 'type:' does not compile ({e})") from None


def _check_fp8(t: TrainConfig) -> None:
    """train.fp8 keys; the checks that need the device and torchao run at start (parallel.fp8.check_fp8)."""
    import re

    _choice("train.fp8", t.fp8, ("off", "tensorwise", "rowwise", "rowwise_with_gw_hp"))
    _choice("train.fp8_filter", t.fp8_filter, ("auto", "all"))
    for pattern in t.fp8_exclude:
        try:
            re.compile(str(pattern))
        except re.error as e:
            raise ConfigError(f"train.fp8_exclude: {pattern!r} is not a regex ({e})") from None
    if t.fp8 != "off" and t.precision == "fp16":
        raise ConfigError("train.fp8 with train.precision=fp16: FP8 keeps bf16 activations and gradients between "
                          "its GEMMs; use train.precision=bf16")


def _check_choices(cfg: Config) -> None:
    """The string fields that name one of a fixed set of options."""
    t = cfg.train
    _choice("train.precision", t.precision, ("auto", "fp32", "bf16", "fp16"))
    _choice("train.nonfinite", t.nonfinite, ("skip", "abort"))
    _choice("train.activation_checkpointing", t.activation_checkpointing, ("none", "full", "selective"))
    _choice("train.fused_kernels", t.fused_kernels, ("auto", "triton", "torch"))
    _check_fp8(t)
    _choice("train.document_attention", t.document_attention, ("auto", "flex", "varlen", "sdpa"))
    _choice("schedule.decay", cfg.schedule.decay, ("cosine", "linear", "constant", "wsd"))
    _choice("schedule.on_extend", cfg.schedule.on_extend, ("refuse", "continue", "rewarm"))
    if cfg.schedule.extend_step is not None and (cfg.schedule.extend_lr is None
                                                 or cfg.schedule.extend_mode not in ("continue", "rewarm")):
        raise ConfigError("schedule.extend_step is set without schedule.extend_lr and extend_mode (continue | rewarm): "
                          "these are written by megatrain when a run is extended; remove all three")
    _choice("deepspeed.offload", cfg.deepspeed.offload, ("none", "optimizer", "all"))
    _choice("checkpoint.verify", cfg.checkpoint.verify, ("off", "sizes", "full"))
    _choice("data.verify", cfg.data.verify, ("sizes", "full"))
    _choice("distributed.backend", cfg.distributed.backend, ("auto", "nccl", "gloo"))
    _choice("logging.level", str(cfg.logging.level).upper(), ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: choose one of {', '.join(allowed)}")
