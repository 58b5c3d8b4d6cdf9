"""Cross-entropy over a vocabulary split across tensor-parallel ranks, in fp32.

Rank ``i`` holds logits for vocabulary ids [i V/p, (i+1) V/p). The loss of one
token is ``log(sum_j exp(z_j - m)) - (z_y - m)`` with ``m`` the max logit; the
max, the target logit and the sum of exponentials are each all-reduced over the
TP group (three reductions of N floats), so full logits are never gathered.
Subtracting the max before ``exp`` keeps every exponent <= 0: no overflow even
for bf16 logits in the hundreds, and the fp32 sum keeps its precision.

Two entry points:

- :func:`vocab_parallel_cross_entropy`: per-token losses from logits that
  already exist (pipeline last stage, tests).
- :func:`fused_linear_cross_entropy`: the output head and the loss together,
  over chunks of tokens; forward computes the loss *and* the gradients of the
  hidden states and of the head weight chunk by chunk, so at most one chunk of
  fp32 logits (``chunk x V/p``) exists at a time instead of ``N x V``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from megatrain.parallel.mappings import all_reduce_tp

IGNORE_INDEX = -100


def _vocab_range(local_vocab: int, group: Optional[Any]) -> tuple[int, int]:
    rank = 0 if group is None else dist.get_rank(group)
    return rank * local_vocab, (rank + 1) * local_vocab


def _loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, group: Optional[Any],
                   need_grad: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token loss (N,) and d(loss_t)/d(logits) (N, V/p) for fp32 ``logits`` (modified in place)."""
    start, end = _vocab_range(logits.shape[-1], group)
    logits_max = logits.max(dim=-1).values
    all_reduce_tp(logits_max, group, dist.ReduceOp.MAX)
    logits.sub_(logits_max.unsqueeze(-1))

    ignored = labels == IGNORE_INDEX
    outside = (labels < start) | (labels >= end) | ignored
    local_t = (labels - start).masked_fill(outside, 0)
    rows = torch.arange(labels.shape[0], device=labels.device)
    target = logits[rows, local_t].masked_fill(outside, 0.0)
    all_reduce_tp(target, group)

    logits.exp_()  # logits now hold exp(z - m)
    sum_exp = logits.sum(dim=-1)
    all_reduce_tp(sum_exp, group)
    loss = (torch.log(sum_exp) - target).masked_fill(ignored, 0.0)
    if not need_grad:
        return loss, None
    grad = logits.div_(sum_exp.unsqueeze(-1))  # softmax
    grad[rows, local_t] -= (~outside).to(grad.dtype)
    grad.masked_fill_(ignored.unsqueeze(-1), 0.0)
    return loss, grad


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group):  # type: ignore[override]
        z = logits.float().reshape(-1, logits.shape[-1]).clone()
        loss, grad = _loss_and_grad(z, labels.reshape(-1), group, logits.requires_grad)
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return loss.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        g = grad * grad_loss.reshape(-1, 1).float()
        return g.view(ctx.shape).to(ctx.dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                 group: Optional[Any] = None) -> torch.Tensor:
    """Per-token losses (same shape as ``labels``; 0 where ``labels == -100``) from local
    logits ``(..., V/p)``. Computed in fp32 whatever the logits' dtype."""
    return _VocabParallelCE.apply(logits, labels, group)


def masked_mean(token_losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over tokens that are not ignored (0 when all are ignored, never NaN)."""
    valid = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return token_losses.sum() / valid


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, group, chunk):  # type: ignore[override]
        # hidden (N, C) replicated over TP; weight (V/p, C) local shard; labels (N,)
        n = hidden.shape[0]
        valid = (labels != IGNORE_INDEX).sum().clamp(min=1).float()
        need = hidden.requires_grad or weight.requires_grad
        grad_h = torch.empty_like(hidden) if need else None
        # The weight gradient accumulates in place in the weight's dtype (each GEMM accumulates in fp32
        # internally): an fp32 buffer plus a per-chunk temporary would double the head's extra memory.
        grad_w = torch.zeros_like(weight) if need else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            h = hidden[s:s + chunk]
            z = (h @ weight.t()).float()  # (chunk, V/p) fp32: the only logits that exist
            loss, g = _loss_and_grad(z, labels[s:s + chunk], group, need)
            total += loss.sum()
            if need:
                g = g.div_(valid).to(hidden.dtype)
                grad_h[s:s + chunk] = g @ weight
                grad_w.addmm_(g.t(), h)
        if need:
            ctx.save_for_backward(grad_h, grad_w)
        return total / valid

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None, None


def auto_chunk_tokens(local_vocab: int, budget_bytes: int = 256 << 20) -> int:
    """Tokens per chunk so that one chunk of fp32 logits stays within ``budget_bytes``."""
    return max(64, min(65536, budget_bytes // (4 * local_vocab)))


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               group: Optional[Any] = None, chunk_tokens: int = 0) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` without materialising the logits.

    ``hidden`` (..., C) must already be in the TP region (``copy_to_tp`` applied by the caller, so its
    gradient is all-reduced across TP ranks); ``weight`` is this rank's (V/p, C) shard.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk_tokens or auto_chunk_tokens(weight.shape[0])
    return _FusedLinearCE.apply(h, weight, labels.reshape(-1), group, chunk)
