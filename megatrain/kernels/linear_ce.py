"""Output head + cross-entropy, chunked over tokens, with the softmax in place on the GEMM's output.

Same contract as :func:`megatrain.parallel.cross_entropy.fused_linear_cross_entropy`
(the reference): mean loss over non-ignored labels of ``hidden @ weight.T``,
vocab-parallel over ``group``; forward also computes the gradients of hidden and
weight chunk by chunk, so backward is two scalings.

The difference is memory traffic and memory. The reference copies each chunk of
logits to fp32 and walks it about eight times (max, subtract, exp, sum, divide,
one-hot, cast). Here the logits stay in the GEMM's dtype and two kernels touch
them: one pass for the row statistics (online max and sum of exponentials, and
the target logit), one pass that overwrites the logits with the gradient
``(softmax - onehot) / n_valid``. Between the two, TP ranks combine their
statistics (a MAX and one SUM all-reduce), so the vocab-parallel case costs the
same two passes. With bf16 logits a chunk needs ``2 x chunk x V/p`` bytes, so
the default chunk (256 MiB of logits) keeps the head's extra memory for a
128K vocabulary at about 0.8 GiB including the bf16 weight gradient.

The statistics and gradient steps are pluggable (:class:`CEOps`): Triton kernels
on GPU, and a PyTorch version of the very same steps that CPU tests use to
check the chunking and the TP combination against the reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

IGNORE_INDEX = -100
DEFAULT_LOGITS_BUDGET = 256 << 20


@dataclass(frozen=True)
class CEOps:
    """stats(z, labels, vocab_start) -> (max, sumexp, target), each (n,) fp32;
    grad_(z, labels, lse, scale, vocab_start) overwrites z with the scaled gradient."""

    stats: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    grad_: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], None]


def _torch_stats(z: torch.Tensor, labels: torch.Tensor, vocab_start: int):
    zf = z.float()
    m = zf.max(dim=-1).values
    s = torch.exp(zf - m.unsqueeze(-1)).sum(dim=-1)
    local = labels - vocab_start
    inside = (labels != IGNORE_INDEX) & (local >= 0) & (local < z.shape[-1])
    rows = torch.arange(z.shape[0], device=z.device)
    target = zf[rows, local.masked_fill(~inside, 0)].masked_fill(~inside, 0.0)
    return m, s, target


def _torch_grad_(z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                 vocab_start: int) -> None:
    g = torch.exp(z.float() - lse.unsqueeze(-1))
    local = labels - vocab_start
    inside = (labels != IGNORE_INDEX) & (local >= 0) & (local < z.shape[-1])
    rows = torch.arange(z.shape[0], device=z.device)
    g[rows, local.masked_fill(~inside, 0)] -= inside.to(g.dtype)
    g.mul_(scale)
    g.masked_fill_((labels == IGNORE_INDEX).unsqueeze(-1), 0.0)
    z.copy_(g)


TORCH_OPS = CEOps(_torch_stats, _torch_grad_)


@functools.lru_cache(maxsize=1)
def triton_ops() -> CEOps:
    """The Triton statistics and gradient kernels (GPU only)."""
    import triton

    from megatrain.kernels import triton_kernels as tk

    def stats(z, labels, vocab_start):
        n, v = z.shape
        m, s, t = (torch.empty(n, dtype=torch.float32, device=z.device) for _ in range(3))
        tk.ce_stats_kernel[(n,)](z, labels, m, s, t, z.stride(0), v, vocab_start, IGNORE_INDEX, BLOCK=4096,
                                 num_warps=8)
        return m, s, t

    def grad_(z, labels, lse, scale, vocab_start):
        n, v = z.shape
        grid = (n, triton.cdiv(v, 4096))
        tk.ce_grad_kernel[grid](z, labels, lse, scale, z.stride(0), v, vocab_start, IGNORE_INDEX, BLOCK=4096,
                                num_warps=8)

    return CEOps(stats, grad_)


def _combine_tp(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    """Global log-sum-exp minus the target logit (per-token loss) from per-rank statistics."""
    if group is not None and dist.get_world_size(group) > 1:
        gm = m.clone()
        dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=group)
        st = torch.stack([s * torch.exp(m - gm), t])  # rescale each rank's sum to the global max
        dist.all_reduce(st, group=group)
        m, s, t = gm, st[0], st[1]
    return m + torch.log(s), t


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, group, chunk, ops):  # type: ignore[override]
        # hidden (N, C) replicated over TP; weight (V/p, C) this rank's shard; labels (N,)
        v_local = weight.shape[0]
        vocab_start = (dist.get_rank(group) if group is not None else 0) * v_local
        scale = 1.0 / (labels != IGNORE_INDEX).sum().clamp(min=1).float()  # stays on the device
        need = hidden.requires_grad or weight.requires_grad
        grad_h = torch.empty_like(hidden) if need else None
        # accumulated in place in the weight's dtype: an fp32 copy would double the head's extra memory
        grad_w = torch.zeros_like(weight) if need else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h, y = hidden[s:s + chunk], labels[s:s + chunk]
            z = h @ weight.t()  # (chunk, V/p) in the compute dtype: the only logits that exist
            m, se, tgt = ops.stats(z, y, vocab_start)
            lse, tgt = _combine_tp(m, se, tgt, group)
            total += (lse - tgt).masked_fill(y == IGNORE_INDEX, 0.0).sum()
            if need:
                ops.grad_(z, y, lse, scale.reshape(1), vocab_start)
                torch.mm(z, weight, out=grad_h[s:s + chunk])
                grad_w.addmm_(z.t(), h)
            del z
        if need:
            ctx.save_for_backward(grad_h, grad_w)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        # in place: a fresh product would hold a second weight-sized buffer at the peak
        return grad_h.mul_(grad_out.to(grad_h.dtype)), grad_w.mul_(grad_out.to(grad_w.dtype)), None, None, None, None


def auto_chunk_tokens(local_vocab: int, itemsize: int, budget_bytes: int = DEFAULT_LOGITS_BUDGET) -> int:
    """Tokens per chunk so that one chunk of logits (in their own dtype) fits ``budget_bytes``;
    a multiple of 128 so the GEMMs keep whole tiles."""
    tokens = budget_bytes // (itemsize * local_vocab)
    return int(max(128, min(32768, tokens // 128 * 128)))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         group: Optional[Any] = None, chunk_tokens: int = 0,
                         ops: Optional[CEOps] = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` (-100 ignored), vocab-parallel.

    ``hidden`` (..., C) must already be in the TP region (the caller applied ``copy_to_tp``);
    ``weight`` is this rank's (V/p, C) shard. ``ops`` defaults to Triton on CUDA, PyTorch elsewhere.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    if ops is None:
        ops = triton_ops() if h.is_cuda else TORCH_OPS
    chunk = chunk_tokens or auto_chunk_tokens(weight.shape[0], torch.finfo(h.dtype).bits // 8)
    return _LinearCE.apply(h, weight, labels.reshape(-1), group, chunk, ops)
