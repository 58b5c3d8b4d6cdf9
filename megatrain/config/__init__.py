"""One typed config tree for a megatrain run.

A run is a YAML file plus ``dotted.key=value`` overrides. Loading goes:
defaults -> YAML -> overrides, then ``model.preset`` (if given) fills every model
field that neither the YAML nor an override set, then :func:`validate` checks
the whole tree once and names the field at fault.

Every field carries its documentation as ``metadata["doc"]``; ``--help-config``
prints them. Components receive their own section (``cfg.model``,
``cfg.data`` ...), never the whole tree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """A user-fixable problem in the run configuration; the message names the field."""


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field: ``lo``/``hi`` bounds, each inclusive unless marked open."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, v: float) -> bool:
        return ((self.lo is None or (v > self.lo if self.lo_open else v >= self.lo))
                and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)))

    def __str__(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {num(self.hi)}"
        return f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)  # [0, 1]
# Upper bounds: far past any real run, low enough that the arithmetic on them (sample counts, index sizes,
# timedeltas, tensor shapes) stays exact and allocatable, so an absurd value is named here, not by numpy or C++.
MAX_STEPS = 10**9
STEPS = Range(0, MAX_STEPS)  # step counts and intervals
DIM = Range(1, 2**20)  # widths
COUNT = Range(1, 2**16)  # heads, layers, parallel sizes
LENGTH = Range(1, 2**24)  # tokens in one sequence
WEEK_S = 7 * 24 * 3600.0
INT_LIMIT = 2**53  # any int field without its own upper bound


def _f(default: Any, doc: str, range: Optional[Range] = None) -> Any:  # noqa: A002 (reads best at call sites)
    meta = {"doc": doc} if range is None else {"doc": doc, "range": range}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _sub(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"doc": doc})


# --------------------------------------------------------------------------- sections


@dataclass
class RopeScalingConfig:
    """Llama-3.1 style frequency-dependent RoPE scaling (``rope_type: llama3``)."""

    factor: float = _f(8.0, "how much longer than the original context the model is meant to read", POSITIVE)
    low_freq_factor: float = _f(1.0, "wavelengths longer than original_max / low_freq_factor are scaled by 1/factor", POSITIVE)
    high_freq_factor: float = _f(4.0, "wavelengths shorter than original_max / high_freq_factor are kept", POSITIVE)
    original_max_position_embeddings: int = _f(8192, "context length the unscaled model was trained at", LENGTH)


@dataclass
class ModelConfig:
    """LLaMA architecture. ``preset`` fills every field the run did not set itself."""

    preset: Optional[str] = _f(None, "named shape (debug, demo, llama2-7b, llama3-8b, tinyllama-1.1b, ...)")
    hidden_size: int = _f(256, "model width C", Range(1, 2**17))
    num_layers: int = _f(4, "number of transformer blocks", COUNT)
    num_heads: int = _f(8, "query heads per layer", COUNT)
    num_kv_heads: Optional[int] = _f(None, "key/value heads (grouped-query attention); None means num_heads", COUNT)
    ffn_hidden_size: Optional[int] = _f(None, "SwiGLU inner width; None derives it from multiple_of and ffn_dim_multiplier as LLaMA does", DIM)
    multiple_of: int = _f(256, "the derived FFN width is rounded up to a multiple of this", DIM)
    ffn_dim_multiplier: Optional[float] = _f(None, "scales the derived FFN width (LLaMA-2 70B: 1.3, LLaMA-3: 1.3 / 1.5)", POSITIVE)
    vocab_size: int = _f(32000, "vocabulary size; must match the tokenizer and the dataset sidecar", Range(1, 2**31 - 1))
    norm_eps: float = _f(1e-5, "RMSNorm epsilon", POSITIVE)
    rope_theta: float = _f(10000.0, "RoPE base frequency", POSITIVE)
    rope_scaling: Optional[RopeScalingConfig] = _f(None, "Llama-3.1 RoPE scaling; null for none")
    max_seq_len: int = _f(2048, "longest sequence the RoPE tables are built for", LENGTH)
    tie_embeddings: bool = _f(False, "share the input embedding and the output head")
    init_std: float = _f(0.02, "std of the normal init; residual output projections use init_std / sqrt(2 * num_layers)", POSITIVE)
    dropout: float = _f(0.0, "dropout on attention output and MLP output (LLaMA pretraining uses 0)", Range(0, 1, hi_open=True))

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        """SwiGLU width: explicit, or LLaMA's int(2/3 * 4C) * multiplier rounded up to multiple_of."""
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        hidden = int(2 * (4 * self.hidden_size) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


@dataclass
class ParallelConfig:
    """How the world is cut: TP innermost, then context (CP), then DP, then PP. DP is what is left."""

    tensor: int = _f(1, "tensor-parallel size (ranks that split every weight matrix)", COUNT)
    sequence_parallel: bool = _f(False, "Megatron sequence parallelism inside the TP group: norms and the residual "
                                 "stream hold seq_len / tensor tokens per rank (needs parallel.tensor >= 2)")
    context: int = _f(1, "context-parallel size (DeepSpeed-Ulysses): ranks that split every sequence, with an "
                      "all-to-all around attention", COUNT)
    pipeline: int = _f(1, "pipeline-parallel size (stages)", COUNT)
    pipeline_partition: str = _f("parameters", "how blocks are placed on stages: parameters | uniform | type:<regex>")
    activation_checkpoint_interval: int = _f(0, "pipeline only: checkpoint every N layers (0 = off)", Range(0, 2**16))


@dataclass
class DataConfig:
    """Where tokens come from (Megatron .bin/.idx prefixes) and how they are split and mixed."""

    path: Optional[str] = _f(None, "a dataset prefix, or a blend 'W1 P1 W2 P2 ...'; None runs the built-in demo corpus")
    tokenizer: Optional[str] = _f(None, "sentencepiece .model file; checked against the dataset sidecar")
    split: str = _f("969,30,1", "train,valid,test weights over documents")
    cache_dir: Optional[str] = _f(None, "where sample indices are cached (.npy); default: next to the dataset")
    num_workers: int = _f(0, "background processes that assemble batches (0 = in the training process, with a prefetch thread)", Range(0, 1024))
    verify: str = _f("sizes", "dataset check at start: sizes (index vs file sizes) | full (every token < vocab)")
    document_mask: bool = _f(False, "packed samples respect documents: a token attends only to earlier tokens of its "
                                    "own document (boundaries from the sample index; docs/data.md)")
    document_positions: bool = _f(True, "with document_mask: RoPE positions restart at 0 at each document (false: "
                                        "positions run 0..seq_len-1 across the sample)")
    eod_mask_loss: bool = _f(False, "no loss on each document's first token in a sample (it would be predicted from "
                                    "the previous document); Megatron's --eod-mask-loss, from the sample index")


@dataclass
class OptimizerConfig:
    """AdamW. Norm weights and biases get no weight decay."""

    lr: float = _f(3e-4, "peak learning rate", POSITIVE)
    min_lr: float = _f(3e-5, "learning rate at the end of the decay", NON_NEGATIVE)
    beta1: float = _f(0.9, "AdamW beta1", Range(0, 1, hi_open=True))
    beta2: float = _f(0.95, "AdamW beta2", Range(0, 1, hi_open=True))
    eps: float = _f(1e-8, "AdamW epsilon", POSITIVE)
    weight_decay: float = _f(0.1, "decoupled weight decay (not applied to norms and biases)", NON_NEGATIVE)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)", NON_NEGATIVE)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then a decay to optimizer.min_lr."""

    warmup_steps: int = _f(100, "linear warmup from 0 to the peak LR", STEPS)
    decay: str = _f("cosine", "cosine | linear | constant | wsd")
    decay_steps: Optional[int] = _f(None, "steps from the start to the end of decay; None means train.max_steps", Range(1, MAX_STEPS))
    wsd_decay_fraction: float = _f(0.2, "wsd: the final fraction of decay_steps spent cooling down linearly", FRACTION)
    on_extend: str = _f("refuse", "resuming with a later horizon (train.max_steps or decay_steps raised): refuse | "
                                  "continue (the LR goes on from where it is down to min_lr at the new end: no jump) "
                                  "| rewarm (back up to the peak over warmup_steps, then the decay to the new end)")
    extend_step: Optional[int] = _f(None, "set by an extension, not by hand: the step from which the LR follows it",
                                    NON_NEGATIVE)
    extend_lr: Optional[float] = _f(None, "set by an extension: the LR at extend_step", NON_NEGATIVE)
    extend_mode: Optional[str] = _f(None, "set by an extension: continue | rewarm")


@dataclass
class TrainConfig:
    """The step loop: batch shape, length, precision, resume and failure policies."""

    max_steps: int = _f(1000, "optimizer steps to train", Range(1, MAX_STEPS))
    seq_len: int = _f(256, "tokens per sample (inputs); each sample reads seq_len + 1 tokens", LENGTH)
    micro_batch_size: int = _f(4, "samples per forward/backward on one data-parallel rank", Range(1, 2**20))
    global_batch_size: Optional[int] = _f(None, "samples per optimizer step over all DP ranks; None = micro_batch x DP", Range(1, 2**30))
    precision: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16 (bf16/fp16 keep fp32 masters)")
    seed: int = _f(1234, "seeds weights, data order and dropout", Range(0, 2**32 - 1))
    resume: str = _f("auto", "auto (newest complete checkpoint, else fresh) | never | PATH")
    resume_allow_changes: list = _f([], "what may differ from the checkpoint: data, tokenizer, model, schedule, topology (a new TP/PP/DP without portable optimizer state: weights only)")
    deterministic: bool = _f(False, "deterministic algorithms (bitwise-reproducible resume, slower)")
    nonfinite: str = _f("skip", "NaN/Inf loss or grad norm: skip (drop the update) | abort")
    max_nonfinite_in_a_row: int = _f(10, "skip policy: abort after this many non-finite steps in a row", Range(1, MAX_STEPS))
    spike_zscore: float = _f(0.0, "treat a loss this many std above the recent mean as a spike (0 = off)", NON_NEGATIVE)
    spike_window: int = _f(100, "steps of loss history for the spike z-score", Range(2, 10**7))
    max_wall_time: Optional[float] = _f(None, "seconds: save and exit with the requeue code before this budget runs out", Range(0, 100 * 365 * 86400.0, lo_open=True))
    activation_checkpointing: str = _f("none", "none | full | selective (keep every GEMM and attention output, recompute the elementwise work: norms, RoPE, SwiGLU, residual adds)")
    fused_kernels: str = _f("auto", "auto (Triton on GPU, PyTorch elsewhere) | triton | torch")
    compile: bool = _f(False, "torch.compile each block (FP8 on a GPU turns it on: its casts need fusing)")
    fp8: str = _f("off", "FP8 GEMMs in the block linears (torchao recipes): off | tensorwise (one scale per tensor, "
                         "fastest) | rowwise (per-row scales, powers of 2, e4m3 gradients) | rowwise_with_gw_hp "
                         "(rowwise, weight gradient GEMM in bf16). GPU: compute capability >= 8.9 and "
                         "precision bf16; CPU: emulated (bf16 or fp32)")
    fp8_filter: str = _f("auto", "which block linears run in FP8: auto (torchao's size thresholds on the local "
                                 "GEMM: small GEMMs lose to the casts) | all (every one whose dims are multiples "
                                 "of 16)")
    fp8_exclude: list = _f([], "regexes of block linear names kept in bf16 (names like blocks.0.attn.qkv, "
                               "blocks.3.mlp.down; re.search)")
    document_attention: str = _f("auto", "attention kernel under data.document_mask: auto (flex on GPU, sdpa on CPU) | "
                                         "flex (flex_attention, document block mask) | varlen (flash varlen_attn) | "
                                         "sdpa (explicit boolean mask; the reference)")
    loss_chunk_tokens: int = _f(0, "tokens per chunk of the fused head + cross-entropy; 0 sizes chunks to ~256 MiB "
                                   "of fp32 logits", Range(0, 2**40))


@dataclass
class EvalConfig:
    """Validation loss and text samples."""

    interval: int = _f(0, "evaluate on the valid split every N steps (0 = only at the end)", STEPS)
    steps: int = _f(10, "micro-batches per evaluation", Range(0, 10**7))
    only: bool = _f(False, "evaluate the run's checkpoint (valid, test, eval.datasets) and exit; --eval-only")
    datasets: list = _f([], "more dataset prefixes to evaluate on (eval.steps micro-batches each, from the start)")
    sample_interval: int = _f(0, "print generated text every N steps (0 = only at the end)", STEPS)
    prompts: list = _f(["The "], "prompts for text samples")
    sample_tokens: int = _f(32, "tokens generated per prompt", Range(0, 2**20))
    top_p: float = _f(0.0, "nucleus sampling threshold (0 = greedy)", FRACTION)
    temperature: float = _f(1.0, "sampling temperature (with top_p)", POSITIVE)


@dataclass
class DeepSpeedSection:
    """Engine settings. Batch, precision, clipping and the optimizer come from the sections above."""

    template: Optional[str] = _f(None, "ds_configs/ name or JSON path; None picks one from zero_stage, offload and pipeline")
    zero_stage: int = _f(1, "ZeRO stage 0-3 (stages 2/3 do not combine with pipeline parallelism)")
    offload: str = _f("none", "none | optimizer | all (all = optimizer and parameters; ZeRO-3 only)")


@dataclass
class CheckpointConfig:
    """Saving cadence and integrity."""

    interval: int = _f(0, "save every N steps (0 = only at the end)", STEPS)
    keep_last: int = _f(3, "keep the newest N checkpoints (0 = keep all)", STEPS)
    keep_every: int = _f(0, "additionally keep every checkpoint whose step is a multiple of this (0 = off)", STEPS)
    verify: str = _f("sizes", "check the manifest at load: off | sizes | full (SHA-256 of every file)")
    save_at_end: bool = _f(True, "save when training finishes")
    portable_optimizer: bool = _f(True, "kept so that older configs load; ignored: the AdamW state is always stored once, under canonical names (optim/), and resumes at any TP/PP/DP size or ZeRO stage")
    async_save: bool = _f(True, "write checkpoints in a background thread: training waits only for a copy of the state in host memory (pinned on GPU); off under deepspeed.offload (see docs/checkpoints.md)")


@dataclass
class LoggingConfig:
    """Console, metrics.jsonl and wandb."""

    interval: int = _f(10, "print and record metrics every N steps", Range(1, MAX_STEPS))
    level: str = _f("INFO", "log level of rank 0 (other ranks log warnings and errors)")
    all_ranks: bool = _f(False, "let every rank log at the chosen level")
    wandb_project: Optional[str] = _f(None, "wandb project; offline mode when no API key is set")
    wandb_run_name: Optional[str] = _f(None, "wandb run name (default: the run directory's name)")
    pipeline_timing: bool = _f(False, "pipelined runs: time every pipeline instruction per stage and record "
                               "compute time and the measured bubble next to (p-1)/m at each log interval")


@dataclass
class DistributedConfig:
    """Process group and failure detection."""

    backend: str = _f("auto", "auto (nccl on GPU, gloo on CPU) | nccl | gloo")
    timeout_s: float = _f(600.0, "a collective that waits longer than this ends the job with an error", Range(0, WEEK_S, lo_open=True))
    preflight_timeout_s: float = _f(60.0, "the start-up all-reduce must finish within this", Range(0, WEEK_S, lo_open=True))


@dataclass
class RunConfig:
    """Where the run lives."""

    dir: str = _f("runs/demo", "run directory: config.yaml, metrics.jsonl, checkpoints/ (default with --config "
                             "X.yaml: runs/X; '.' for the working directory, never an empty value)")
    name: Optional[str] = _f(None, "human name for logs and wandb (default: the directory's name)")


@dataclass
class Config:
    """A whole megatrain run."""

    model: ModelConfig = _sub(ModelConfig, "architecture")
    parallel: ParallelConfig = _sub(ParallelConfig, "tensor and pipeline parallel sizes")
    data: DataConfig = _sub(DataConfig, "datasets")
    optimizer: OptimizerConfig = _sub(OptimizerConfig, "AdamW")
    schedule: ScheduleConfig = _sub(ScheduleConfig, "learning-rate schedule")
    train: TrainConfig = _sub(TrainConfig, "the loop")
    eval: EvalConfig = _sub(EvalConfig, "validation and samples")
    deepspeed: DeepSpeedSection = _sub(DeepSpeedSection, "ZeRO and engine template")
    checkpoint: CheckpointConfig = _sub(CheckpointConfig, "checkpoints")
    logging: LoggingConfig = _sub(LoggingConfig, "logging")
    distributed: DistributedConfig = _sub(DistributedConfig, "process groups and timeouts")
    run: RunConfig = _sub(RunConfig, "run directory")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return _build(cls, d, "")

    def hash(self) -> str:
        """Stable hash of the resolved config (sorted JSON), first 16 hex digits."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def model_hash(self) -> str:
        """Hash of what determines the shapes of the weights (used by resume guards)."""
        m = dataclasses.asdict(self.model)
        m.pop("preset", None)
        m.pop("dropout", None)
        m.pop("init_std", None)
        return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- presets

PRESETS: dict[str, dict[str, Any]] = {}


def register_preset(name: str, **fields: Any) -> None:
    """Register a named model shape; ``model.preset=name`` selects it."""
    PRESETS[name] = fields


_L3_SCALING = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

register_preset("debug", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=160,
                vocab_size=512, max_seq_len=256)
register_preset("demo", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, ffn_hidden_size=688,
                vocab_size=4096, max_seq_len=512, tie_embeddings=True)
register_preset("tinyllama-1.1b", hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                ffn_hidden_size=5632, vocab_size=32000, max_seq_len=2048)
register_preset("llama2-7b", hidden_size=4096, num_layers=32, num_heads=32, ffn_hidden_size=11008,
                vocab_size=32000, max_seq_len=4096)
register_preset("llama2-13b", hidden_size=5120, num_layers=40, num_heads=40, ffn_hidden_size=13824,
                vocab_size=32000, max_seq_len=4096)
register_preset("llama2-70b", hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                ffn_hidden_size=28672, vocab_size=32000, max_seq_len=4096)
register_preset("llama3-8b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                ffn_hidden_size=14336, vocab_size=128256, rope_theta=500000.0, max_seq_len=8192)
# Llama 3.1 8B: the Llama 3 8B shape with a 128K context (RoPE scaling factor 8, as Meta's config)
register_preset("llama3.1-8b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                ffn_hidden_size=14336, vocab_size=128256, rope_theta=500000.0, max_seq_len=131072,
                rope_scaling={**_L3_SCALING, "factor": 8.0})
register_preset("llama3-70b", hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                ffn_hidden_size=28672, vocab_size=128256, rope_theta=500000.0, max_seq_len=8192)
register_preset("llama3.2-1b", hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                ffn_hidden_size=8192, vocab_size=128256, rope_theta=500000.0, max_seq_len=131072,
                tie_embeddings=True, rope_scaling=_L3_SCALING)
register_preset("llama3.2-3b", hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8,
                ffn_hidden_size=8192, vocab_size=128256, rope_theta=500000.0, max_seq_len=131072,
                tie_embeddings=True, rope_scaling=_L3_SCALING)


# --------------------------------------------------------------------------- building


COMMA_LISTS = ("train.resume_allow_changes",)  # lists of names, also written a,b on the command line


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to ``tp``, or raise naming ``key``."""
    optional, inner = _is_optional(tp)
    if isinstance(value, str) and value.lower() in ("none", "null") and optional:
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: may not be null")
    if dataclasses.is_dataclass(inner):
        if isinstance(value, inner):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {inner.__name__}, got {value!r}")
        return _build(inner, value, key + ".")
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if inner is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if inner is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if inner is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if inner is list:
        if isinstance(value, list):
            return list(value)
        if isinstance(value, str) and key in COMMA_LISTS:
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, str):  # one item: "Hello, world" is one prompt, not two
            return [value]
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, d: dict, prefix: str) -> Any:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            raise ConfigError(f"{prefix}{k}: unknown key (known keys in {prefix or 'the top level'}: "
                              f"{', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in d.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(arg: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value); the value is parsed as YAML (so 1e-4, true, [1,2] work)."""
    import yaml

    if "=" not in arg:
        raise ConfigError(f"{arg!r}: overrides are written dotted.key=value")
    key, raw = arg.split("=", 1)
    if raw.strip().lower() in ("on", "off", "yes", "no", "y", "n"):
        # YAML 1.1 reads these as booleans; keep the word (verify=off, deepspeed.offload=none-style values),
        # boolean fields accept the word too
        return key.strip(), raw.strip()
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict,)) and not raw.strip().startswith("{"):
        value = raw
    return key.strip(), value


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults <- YAML file <- ``dotted.key=value`` overrides <- preset for unset model fields; validated."""
    import yaml

    tree: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"--config {p}: is a directory; pass a YAML file")
        if not p.is_file():
            raise ConfigError(f"--config {p}: no such file")
        try:
            loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_unique_key_loader()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {p}: not valid YAML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"--config {p}: not UTF-8 text ({e.reason} at byte {e.start}); is it the right file?") from None
        except OSError as e:  # permissions, an unreadable network file system
            raise ConfigError(f"--config {p}: cannot be read ({e.strerror or e}); check its permissions") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {p}: the top level must be a mapping of sections")
        check_expanded_size(loaded, f"--config {p}")
        tree = loaded
        run = tree.get("run")
        if run is None or isinstance(run, dict) and "dir" not in run:
            # a run from X.yaml lives in runs/X unless it says otherwise, not in the demo's runs/demo
            tree["run"] = {**(run or {}), "dir": f"runs/{p.stem}"}
    for arg in overrides or []:
        key, value = parse_override(arg)
        check_expanded_size(value, arg.split("=", 1)[0])
        _set_dotted(tree, key, value)
    return config_from_tree(tree)


MAX_CONFIG_NODES = 100_000  # a real run config has a few hundred values


def check_expanded_size(tree: Any, where: str) -> None:
    """Refuse YAML whose aliases expand to more than MAX_CONFIG_NODES values (a 'billion laughs' file of a
    few hundred bytes would otherwise take minutes and all memory when the tree is copied)."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(obj: Any) -> int:  # each shared object is sized once; its size counts at every reference
        key = id(obj)
        if key in open_:
            raise ConfigError(f"{where}: a YAML alias refers to the mapping or list that contains it; a config "
                              f"must be a tree")
        if key not in sizes:
            open_.add(key)
            items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
            total = 1
            for item in items:
                total += size(item)
                if total > MAX_CONFIG_NODES:
                    break
            sizes[key] = total
            open_.discard(key)
        return sizes[key]

    n = size(tree)
    if n > MAX_CONFIG_NODES:
        raise ConfigError(f"{where}: expands to more than {MAX_CONFIG_NODES:,} values (YAML aliases that repeat "
                          f"themselves); write the values out instead of nesting aliases")


def _unique_key_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that refuses a key written twice in one mapping (YAML would keep the last silently)."""

        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} appears twice in one mapping (also {seen[key]}); keep one",
                        key_node.start_mark)
                seen[key] = f"line {key_node.start_mark.line + 1}"
            return super().construct_mapping(node, deep=deep)

    return Loader


def config_from_tree(tree: dict) -> Config:
    """Build, apply the preset to unset model fields, validate."""
    tree = json.loads(json.dumps(tree))  # deep copy, plain types
    model = tree.get("model") or {}
    preset = model.get("preset")
    if preset is not None:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
        for k, v in PRESETS[preset].items():
            model.setdefault(k, v)
        tree["model"] = model
    cfg = Config.from_dict(tree)
    validate(cfg)
    return cfg


def config_to_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf field: the reference behind ``--help-config``."""
    out = []
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        _, inner = _is_optional(hint)
        if dataclasses.is_dataclass(inner) and f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out += describe_fields(inner, prefix + f.name + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            doc, allowed = f.metadata.get("doc", ""), f.metadata.get("range")
            out.append((prefix + f.name, repr(default), f"{doc} [{allowed}]" if allowed else doc))
    return out


# The checks use the classes above; imported last so that they find them (megatrain/config/checks.py).
from megatrain.config.checks import validate, validate_model, validate_sequence_split, validate_world  # noqa: E402,F401
