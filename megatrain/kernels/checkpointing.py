"""Selective activation checkpointing: keep what is expensive to recompute, recompute the rest.

``train.activation_checkpointing=selective`` runs each block under
``torch.utils.checkpoint`` with a policy that saves the outputs of the GEMMs
and of the attention kernel (the work that dominates a block) and drops
everything elementwise: RMSNorm outputs, the rotated q/k/v, the residual sums
and the SwiGLU product are recomputed from the saved GEMM outputs in backward.
For the TinyLlama shape that keeps about 17.5 C bytes per token and layer
instead of about 29 C (C = hidden size), for a recomputation of the
elementwise forward kernels only (a few percent of the step; see
docs/perf-notes.md). With flash/cuDNN attention there is no T x T attention
matrix to drop, so Megatron's "recompute the attention core" would save
nothing here; this policy is the useful selective variant.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


@functools.lru_cache(maxsize=1)
def _saved_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_efficient_attention", "_flash_attention_forward", "_efficient_attention_forward")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``fn(*args)`` with GEMM and attention outputs saved and elementwise results recomputed."""
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _policy))
