"""The model's elementwise and attention kernels, in plain PyTorch.

Every function here is the reference implementation and the CPU path. Faster
GPU versions (fused Triton kernels, torch.compile) plug in behind the same
signatures so that the model file never changes; tests compare them with
these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, result in the input's dtype times the weight (Hugging Face's order of casts)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, H, D) and k (B, T, K, D) by position; cos/sin are (T, D) fp32 tables."""
    cos = cos[None, :, None, :].to(q.dtype)
    sin = sin[None, :, None, :].to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention, q (B, H, T, D), k/v (B, K, T, D) with H a multiple of K (grouped-query)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                          enable_gqa=q.shape[1] != k.shape[1])


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for (..., 2F) laid out [gate | up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
