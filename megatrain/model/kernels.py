"""The model's elementwise, attention and loss kernels: plain-PyTorch references plus a dispatch.

The ``*_reference`` functions here are the definition of what each kernel
computes and the CPU path. :func:`configure_kernels` (called once per process,
from ``build_model`` / the engine) selects faster implementations behind the
same signatures so the model file never changes:

- ``triton``: fused Triton kernels from :mod:`megatrain.kernels` for CUDA
  tensors (RMSNorm, SwiGLU, RoPE, and the chunked head + cross-entropy). CPU
  tensors, and code being traced by ``torch.compile`` (whose own generated
  kernels fuse these ops with their neighbours), still take the reference.
- ``torch``: the references everywhere.
- ``auto``: ``triton`` where Triton and a GPU are present, else ``torch``.

Attention is always SDPA; ``attention=`` picks which SDPA backend is tried
first (see docs/perf-notes.md for the measurements behind the default).
Document-masked attention (``data.document_mask``) has its own kernels in
:mod:`megatrain.model.documents`, chosen by ``document_attention=``.
Tests compare every fused path with the reference.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_fused = False  # Triton kernels for CUDA tensors
_expand_kv = False  # repeat K/V heads before SDPA (for backends without grouped-query support)
ATTENTION_CHOICES = ("auto", "sdpa", "flash", "cudnn", "cudnn-expand", "efficient")


# --------------------------------------------------------------------------- references


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, result in the input's dtype times the weight (Hugging Face's order of casts)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, H, D) and k (B, T, K, D) by position; cos/sin are (T, D) fp32 tables, or (B, T, D)
    when every sample has its own positions (documents)."""
    if cos.dim() == 3:
        cos, sin = cos[:, :, None, :].to(q.dtype), sin[:, :, None, :].to(q.dtype)
    else:
        cos = cos[None, :, None, :].to(q.dtype)
        sin = sin[None, :, None, :].to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for (..., 2F) laid out [gate | up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# --------------------------------------------------------------------------- what the model calls


def _use_fused(x: torch.Tensor) -> bool:
    return _fused and x.is_cuda and not torch.compiler.is_compiling()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (see :func:`rms_norm_reference`)."""
    if _use_fused(x) and x.shape[-1] <= 65536:
        from megatrain.kernels import ops

        return ops.rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)): the residual add fused with the next norm. Fused, the sum is
    written once and not re-read, and backward adds the residual stream's gradient inside the norm's
    backward pass (the reference spends a separate full pass on each add)."""
    if _use_fused(x) and x.shape[-1] <= 65536 and x.dtype == delta.dtype:
        from megatrain.kernels import ops

        return ops.add_rms_norm(x, delta, weight, eps)
    s = x + delta
    return s, rms_norm(s, weight, eps)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q (B, T, H, D) and k (B, T, K, D) (see :func:`apply_rope_reference`)."""
    half = q.shape[-1] // 2
    if _use_fused(q) and half & (half - 1) == 0 and q.shape[-1] % 2 == 0:
        from megatrain.kernels import ops

        return ops.apply_rope(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)


def split_qkv_rope(qkv: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused projection (B, T, K, r+2, D) (per KV group: r query heads, then k, then v) into
    q (B, T, K r, D) and k, v (B, T, K, D), with RoPE applied to q and k; query head h uses KV head h // r.

    The fused version reads the projection once and, in backward, writes its gradient once; sliced views
    cost a zero-filled full-size gradient per slice and two full-size additions per layer."""
    half = qkv.shape[-1] // 2
    if _use_fused(qkv) and half & (half - 1) == 0 and qkv.shape[-1] % 2 == 0:
        from megatrain.kernels import ops

        return ops.split_qkv_rope(qkv, cos, sin)
    b, t, _, r2, d = qkv.shape
    q = qkv[:, :, :, : r2 - 2].reshape(b, t, -1, d)
    k, v = qkv[:, :, :, r2 - 2], qkv[:, :, :, r2 - 1]
    q, k = apply_rope(q, k, cos, sin)
    return q, k, v


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (see :func:`swiglu_reference`)."""
    if _use_fused(gate_up):
        from megatrain.kernels import ops

        return ops.swiglu(gate_up)
    return swiglu_reference(gate_up)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
              documents: Optional[Any] = None) -> torch.Tensor:
    """Causal attention, q (B, H, T, D), k/v (B, K, T, D) with H a multiple of K (grouped-query):
    query head h attends with KV head h // (H / K). With ``documents`` (a DocumentLayout) a token
    attends only within its own document (block-causal; :mod:`megatrain.model.documents`)."""
    if documents is not None:
        from megatrain.model import documents as docs

        return docs.attention(q, k, v, documents, dropout_p)
    gqa = q.shape[1] != k.shape[1]
    if gqa and _expand_kv and q.is_cuda:
        r = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         group: Optional[Any] = None, chunk_tokens: int = 0) -> torch.Tensor:
    """Mean cross-entropy of the head ``hidden @ weight.T`` (vocab-parallel over ``group``) without
    materialising the logits; Triton softmax on GPU, the chunked PyTorch reference elsewhere."""
    if _fused and hidden.is_cuda:
        from megatrain.kernels.linear_ce import linear_cross_entropy as fused

        return fused(hidden, weight, labels, group, chunk_tokens)
    from megatrain.parallel.cross_entropy import fused_linear_cross_entropy

    return fused_linear_cross_entropy(hidden, weight, labels, group, chunk_tokens)


# --------------------------------------------------------------------------- selection


def triton_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def configure_kernels(mode: str = "auto", attention: str = "auto", document_attention: Optional[str] = None) -> str:
    """Select the implementations for this process; returns the mode in effect ("triton" or "torch").

    ``mode`` is ``train.fused_kernels`` (auto | triton | torch); asking for triton where it cannot run
    logs a warning and keeps the references, so CPU runs work with any setting. ``document_attention``
    (``train.document_attention``, given when ``data.document_mask`` is on) picks the block-causal kernel.
    """
    global _fused, _expand_kv
    if mode not in ("auto", "triton", "torch"):
        from megatrain.config import ConfigError

        raise ConfigError(f"train.fused_kernels={mode!r}: expected auto, triton or torch")
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention={attention!r}: expected one of {', '.join(ATTENTION_CHOICES)}")
    ok = triton_available()
    if mode == "triton" and not ok:
        log.warning("train.fused_kernels=triton but Triton or a GPU is missing here: using the PyTorch kernels")
    _fused = mode != "torch" and ok
    _expand_kv = _set_sdpa_backend(attention)
    log.info("kernels: %s elementwise and loss, SDPA backend %s", "Triton" if _fused else "PyTorch", attention)
    if document_attention is not None:
        from megatrain.model import documents

        log.info("kernels: document attention %s", documents.configure(document_attention))
    return "triton" if _fused else "torch"


def _set_sdpa_backend(choice: str) -> bool:
    """Put the chosen SDPA backend first in the process-wide priority order (the others stay as
    fallbacks, so an unsupported shape never drops to the O(T^2)-memory math path silently)."""
    from torch.nn.attention import SDPBackend

    if choice in ("auto", "sdpa") or not torch.cuda.is_available():
        return False
    first = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "cudnn-expand": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}[choice]
    previous = list(torch._C._get_sdp_priority_order())
    torch._C._set_sdp_priority_order([int(first)] + [b for b in previous if b != int(first)])
    torch.backends.cuda.enable_cudnn_sdp(True)
    return choice == "cudnn-expand"
