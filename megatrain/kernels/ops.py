"""Autograd wrappers around the Triton kernels: RMSNorm, SwiGLU and RoPE.

Same signatures and results as the references in :mod:`megatrain.model.kernels`
(which dispatches here for CUDA tensors when Triton is selected). What each one
saves for backward is the minimum: RMSNorm keeps x and one fp32 rstd per row
(the reference keeps an fp32 copy of x and more), SwiGLU keeps only its input
(the reference also keeps silu(gate)), RoPE keeps nothing but the tables.
"""

from __future__ import annotations

import functools

import torch
import triton

from megatrain.kernels import triton_kernels as tk


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter (CPU tensors) in tests
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., C) as (N, C) with a unit last stride, without copying when it already is."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm_warps(block: int) -> int:
    return max(1, min(16, block // 256))


def _norm_fwd(x2: torch.Tensor, delta2, weight: torch.Tensor, eps: float):
    """(y, rstd, s): s = x + delta when delta is given (else x itself), y = RMSNorm(s) * weight."""
    n, c = x2.shape
    y = torch.empty((n, c), dtype=torch.promote_types(x2.dtype, weight.dtype), device=x2.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x2.device)
    s = torch.empty_like(x2) if delta2 is not None else x2
    block = triton.next_power_of_2(c)
    d = delta2 if delta2 is not None else x2
    tk.rms_norm_fwd_kernel[(n,)](x2, d, s, weight, y, rstd, x2.stride(0), d.stride(0), s.stride(0), y.stride(0), c,
                                 eps, BLOCK=block, HAS_DELTA=delta2 is not None, num_warps=_norm_warps(block))
    return y, rstd, s


def _norm_bwd(dy2: torch.Tensor, s2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, ds2=None):
    """(dx, dw); dx includes ds (the residual stream's gradient) when given."""
    n, c = s2.shape
    dx = torch.empty_like(s2)
    programs = max(1, min(n, 4 * _num_sms(s2.device)))
    dw_part = torch.empty((programs, c), dtype=torch.float32, device=s2.device)
    block = triton.next_power_of_2(c)
    d = ds2 if ds2 is not None else dy2
    tk.rms_norm_bwd_kernel[(programs,)](dy2, s2, weight, rstd, dx, dw_part, d, dy2.stride(0), s2.stride(0),
                                        dx.stride(0), d.stride(0), n, c, BLOCK=block, HAS_DS=ds2 is not None,
                                        num_warps=_norm_warps(block))
    return dx, dw_part.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):  # type: ignore[override]
        x2 = _rows(x)
        y, rstd, _ = _norm_fwd(x2, None, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _norm_bwd(_rows(dy), x2, weight, rstd)
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, weight, eps):  # type: ignore[override]
        y, rstd, s = _norm_fwd(_rows(x), _rows(delta), weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        return s.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, ds, dy):  # type: ignore[override]
        s2, weight, rstd = ctx.saved_tensors
        dx, dw = _norm_bwd(_rows(dy), s2, weight, rstd, _rows(ds))
        dx = dx.view(ds.shape)
        return dx, dx, dw, None  # d(x + delta)/dx = d/d delta = identity


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _AddRMSNorm.apply(x, delta, weight, eps)


_SWIGLU_BLOCK = 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):  # type: ignore[override]
        gu = _rows(gate_up)
        n, f = gu.shape[0], gu.shape[1] // 2
        y = torch.empty((n, f), dtype=gate_up.dtype, device=gate_up.device)
        grid = (n, triton.cdiv(f, _SWIGLU_BLOCK))
        tk.swiglu_fwd_kernel[grid](gu, y, f, gu.stride(0), y.stride(0), BLOCK=_SWIGLU_BLOCK, num_warps=4)
        ctx.save_for_backward(gu)
        ctx.shape = gate_up.shape
        return y.view(*gate_up.shape[:-1], f)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        (gu,) = ctx.saved_tensors
        n, f = gu.shape[0], gu.shape[1] // 2
        dy2 = _rows(dy)
        dgu = torch.empty_like(gu)
        grid = (n, triton.cdiv(f, _SWIGLU_BLOCK))
        tk.swiglu_bwd_kernel[grid](dy2, gu, dgu, f, dy2.stride(0), gu.stride(0), dgu.stride(0),
                                   BLOCK=_SWIGLU_BLOCK, num_warps=4)
        return dgu.view(ctx.shape)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(gate_up)


def _cos_strides(cos: torch.Tensor) -> tuple[int, int]:
    """(batch stride, position stride) of a (T, D) table (batch stride 0) or per-sample (B, T, D) tables."""
    return (cos.stride(0), cos.stride(1)) if cos.dim() == 3 else (0, cos.stride(0))


def _rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """Rotate x (B, T, H, D), any strides with a unit last stride, into a new contiguous tensor."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, t, h, d = x.shape
    y = torch.empty((b, t, h, d), dtype=x.dtype, device=x.device)
    block_h = triton.next_power_of_2(h)
    tk.rope_kernel[(b * t,)](x, cos, sin, y, t, h, x.stride(0), x.stride(1), x.stride(2), y.stride(0),
                             y.stride(1), y.stride(2), *_cos_strides(cos), HALF=d // 2, BLOCK_H=block_h,
                             BACKWARD=backward, num_warps=4)
    return y


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, cos, sin, False), _rope_launch(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        return _rope_launch(dq, cos, sin, True), _rope_launch(dk, cos, sin, True), None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return _RoPE.apply(q, k, cos, sin)


def _qkv_launch(qkv, cos, sin, q, k, v, backward: bool) -> None:
    b, t, kv, r2, d = qkv.shape
    nrows = kv * r2
    tk.qkv_rope_kernel[(b * t,)](qkv, cos, sin, q, k, v, t, r2, nrows, qkv.stride(0), qkv.stride(1),
                                 q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                                 v.stride(0), v.stride(1), v.stride(2), *_cos_strides(cos), HALF=d // 2,
                                 BLOCK_R=triton.next_power_of_2(nrows), BACKWARD=backward, num_warps=4)


class _QKVRoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin):  # type: ignore[override]
        b, t, kv, r2, d = qkv.shape
        q = torch.empty((b, t, kv * (r2 - 2), d), dtype=qkv.dtype, device=qkv.device)
        k = torch.empty((b, t, kv, d), dtype=qkv.dtype, device=qkv.device)
        v = torch.empty_like(k)
        _qkv_launch(qkv, cos, sin, q, k, v, False)
        ctx.save_for_backward(cos, sin)
        ctx.shape, ctx.dtype = qkv.shape, qkv.dtype
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        # (autograd materialises unused output gradients as zeros, so all three are tensors)
        dqkv = torch.empty(ctx.shape, dtype=ctx.dtype, device=dq.device)
        dq, dk, dv = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv))
        _qkv_launch(dqkv, cos, sin, dq, dk, dv, True)
        return dqkv, None, None


def split_qkv_rope(qkv: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, K, r+2, D) with unit stride over (r+2, D) -> rotated q (B, T, K r, D), rotated k and v (B, T, K, D)."""
    if qkv.stride(-1) != 1 or qkv.stride(-2) != qkv.shape[-1] or qkv.stride(-3) != qkv.shape[-1] * qkv.shape[-2]:
        qkv = qkv.contiguous()
    if cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return _QKVRoPE.apply(qkv, cos, sin)
