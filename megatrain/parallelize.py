"""Changes applied to a built model from outside it, in one fixed order.

The model file stays plain PyTorch plus the tensor-parallel layers; everything
that rewrites how its blocks run is applied here, after the model (or the
pipeline stage) exists and before DeepSpeed wraps it:

    1. FP8 GEMMs in the block linears apply_fp8 (the GEMM: megatrain.parallel.fp8)
    2. activation recomputation   apply_activation_checkpointing
    3. torch.compile of each block apply_compile

Sequence and context parallelism are not a step here: they are chosen when the parts are built
(``Ctx.sequence_parallel`` / ``Ctx.cp_group``, see docs/architecture.md), so that the pipeline's
LayerSpecs and the plain model get the same layers; the steps below wrap whatever forward that is.

The order matters: recomputation must wrap the FP8 / sequence-parallel forward
it recomputes, and compile must see the final forward (recomputation included)
so that one graph per block covers all of it. ``parallelize`` runs the steps a
config asks for; each step is usable on its own (tests, benchmarks).
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from megatrain.model.llama import Block
from megatrain.parallel.fp8 import RECIPES, Float8Gemm, LinearChoice, choose, fp8_compiles
from megatrain.parallel.layers import ColumnParallelLinear, RowParallelLinear

log = logging.getLogger(__name__)

CHECKPOINT_MODES = ("none", "full", "selective")


def blocks_of(model: nn.Module) -> list[Block]:
    """Every transformer block in ``model`` (a LlamaModel or a pipeline stage), in order."""
    return [m for m in model.modules() if isinstance(m, Block)]


# --------------------------------------------------------------------------- FP8


def fp8_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(canonical name, module) of every column/row-parallel linear inside a transformer block."""
    out = []
    for blk in (m for m in model.modules() if isinstance(m, Block)):
        for sub, mod in blk.named_modules():
            if isinstance(mod, (ColumnParallelLinear, RowParallelLinear)):
                out.append((f"blocks.{blk.layer_idx}.{sub}", mod))
    return out


def apply_fp8(model: nn.Module, recipe: str, *, rule: str = "auto", exclude: Optional[list[str]] = None,
              emulate: Optional[bool] = None) -> list[LinearChoice]:
    """Route the chosen block linears' local GEMMs through FP8; returns the decision for each.

    Only a callable is attached (``module.fp8_gemm``); parameters, their names and the state dict are
    untouched, so checkpoints stay FP8-free and a run resumes with FP8 on or off. ``emulate`` defaults
    to "not on a GPU"."""
    if recipe not in RECIPES:
        raise ValueError(f"train.fp8={recipe!r}: choose one of {', '.join(RECIPES)}")
    if recipe == "off":
        return []
    found = fp8_linears(model)
    if emulate is None:
        device = next((p.device for _, m in found for p in m.parameters()), torch.device("cpu"))
        emulate = device.type != "cuda"
    gemm = Float8Gemm.build(recipe, emulate)
    choices = []
    for name, mod in found:
        # shapes from the layer, not its weight: under ZeRO-3 the weight holds no data outside forward
        c = choose(name, mod.out_features_local, mod.in_features_local, recipe, rule, exclude or [])
        mod.fp8_gemm = gemm if c.fp8 else None
        choices.append(c)
    log.info("FP8 (%s%s): %d of %d block linears", recipe, ", emulated" if emulate else "",
             sum(c.fp8 for c in choices), len(choices))
    return choices


# --------------------------------------------------------------------------- activation recomputation


@functools.lru_cache(maxsize=1)
def _saved_ops() -> frozenset:
    aten = torch.ops.aten
    # mm covers the FP8 GEMMs too: torch.mm on torchao's Float8TrainingTensor is what this policy sees
    # (the _scaled_mm, or the emulated fp32 mm, runs inside the subclass); _scaled_mm is listed for
    # traces that desugar the subclass (torch.compile)
    names = ("mm", "addmm", "bmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_efficient_attention",
             "_flash_attention_forward", "_efficient_attention_forward")
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    # the document-mask kernels (megatrain.model.documents): flex's higher-order op supports selective
    # checkpointing's dispatch modes; varlen is a custom op, registered when its module is imported
    try:
        importlib.import_module("torch.nn.attention.varlen")
        ops.add(torch.ops.torch_attn._varlen_attn.default)
    except (ImportError, AttributeError):
        pass
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    if flex is not None:
        ops.add(flex)
    return frozenset(ops)


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint(fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
    """``fn(*args)`` with the outputs of every GEMM and of the attention kernel saved, and everything
    elementwise recomputed in backward.

    What is recomputed: RMSNorm outputs, the rotated q/k/v, the residual sums and the SwiGLU product,
    all cheap elementwise kernels, from the saved GEMM outputs. For the TinyLlama shape that keeps
    about 17.5 C bytes per token and layer instead of about 29 C (C = hidden size). With flash/cuDNN
    attention there is no T x T score matrix to drop, so Megatron's "recompute the attention core"
    would save nothing; this policy is the variant that pays here (docs/perf-notes.md)."""
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _policy), **kwargs)


def _full_checkpoint(fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> int:
    """Run every block's forward under recomputation (``full``: keep only the block input;
    ``selective``: see :func:`selective_checkpoint`) while training with gradients on. Evaluation and
    generation run the plain forward. Parameter names are unchanged (no wrapper module), so
    checkpoints and the pipeline's LayerSpecs see the same model. Returns the number of blocks."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"activation checkpointing {mode!r}: choose one of {', '.join(CHECKPOINT_MODES)}")
    if mode == "none":
        return 0
    wrap = selective_checkpoint if mode == "selective" else _full_checkpoint
    found = blocks_of(model)
    for blk in found:
        plain = blk.forward  # the bound method (or an earlier step's replacement)

        def forward(*args: Any, _plain: Callable = plain, _blk: Block = blk, **kwargs: Any) -> torch.Tensor:
            if _blk.training and torch.is_grad_enabled():
                return wrap(_plain, *args, **kwargs)
            return _plain(*args, **kwargs)

        blk.forward = forward
    return len(found)


# --------------------------------------------------------------------------- compile


def apply_compile(model: nn.Module, seq_len: Optional[int] = None, mode: Optional[str] = None,
                  backend: str = "inductor") -> int:
    """torch.compile every block in place; returns how many.

    Each block is compiled on its own (``nn.Module.compile``) rather than the whole model: one graph
    per block keeps compile time to that of a single layer (with ``inline_inbuilt_nn_modules`` every
    block reuses the first block's code, its weights being graph inputs), and leaves the embedding,
    the chunked loss and DeepSpeed's hooks outside the graph. Inside a compiled block the kernels
    module takes the plain-PyTorch references (it checks ``torch.compiler.is_compiling``), so
    Inductor sees ordinary ops and fuses RMSNorm, RoPE, SwiGLU and the residual adds.

    ``seq_len`` pre-builds the RoPE tables outside the graph; all blocks then share one table cache
    so the compiled code's guards see the same tensors in every layer (no recompiles)."""
    found = blocks_of(model)
    if not found:
        return 0
    shared = found[0].attn.rotary
    device = next(found[0].parameters()).device
    if seq_len:
        shared.tables(seq_len, device)
    for blk in found:
        blk.attn.rotary = shared  # identical tables (same config); one object, one set of guards
        blk.compile(backend=backend, mode=mode, dynamic=False)
    # headroom for a few shape variants (train / eval lengths) without falling back to eager
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    log.info("torch.compile: %d blocks (mode %s)", len(found), mode or "default")
    return len(found)


# --------------------------------------------------------------------------- all of it, in order


def parallelize(model: nn.Module, train: Any) -> nn.Module:
    """Apply what ``train`` (the run's TrainConfig) asks for, in the fixed order above; returns ``model``.

    FP8 on a GPU turns compile on (:func:`megatrain.parallel.fp8.fp8_compiles` says why)."""
    fp8 = getattr(train, "fp8", "off")
    if fp8 != "off":
        apply_fp8(model, fp8, rule=train.fp8_filter, exclude=train.fp8_exclude)
    apply_activation_checkpointing(model, train.activation_checkpointing)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if train.compile or fp8_compiles(train, device.type):
        apply_compile(model, train.seq_len)
    return model
