"""Context parallelism, DeepSpeed-Ulysses style: every context rank holds a contiguous slice of each
sequence, and attention sees the whole sequence for a subset of heads.

Outside attention a rank works on its T/cp tokens (embedding, norms, GEMMs, MLP, loss: everything
that is per token). Around attention two all-to-alls swap which axis is split:

    q (B, T/cp, H, D)  --all-to-all-->  (B, T, H/cp, D)   attention over the whole sequence
    y (B, T, H/cp, D)  --all-to-all-->  (B, T/cp, H, D)   back to this rank's tokens

Each all-to-all moves (cp-1)/cp of the tensor, so the volume per rank falls with cp (unlike
the all-gather of K/V that ring attention needs). With tensor parallelism the heads are split by TP
first (H here is this TP rank's H/tp), then by context. Grouped-query attention with fewer KV
heads per TP rank than context ranks replicates each KV head ``cp / K`` times before the
all-to-all, so that rank c receives exactly the KV head its query heads use (DeepSpeed's
``UlyssesSPAttentionHF`` does the same; its ``DistributedAttention`` refuses K < cp).

Why not DeepSpeed's classes: ``deepspeed.sequence.layer.DistributedAttention`` reads the context rank
from DeepSpeed's process-global group registry (``groups._get_sequence_parallel_rank``), while our
groups come from an explicit ParallelState and the model must not import DeepSpeed; it also asserts
K >= cp. ``UlyssesSPAttentionHF`` is bound to Hugging Face's attention interface and a seq-first
layout. The collective itself is one ``all_to_all_single`` either way.

The loss: each rank's cross-entropy covers its own tokens; :func:`context_mean` turns that into the
token-weighted mean over the whole sequence on every context rank (the same value everywhere, so
logging, non-finite checks and the pipeline engine's loss averaging need nothing special), with a
backward that scales by cp so that DeepSpeed's gradient *average* over data x context ranks equals
the sum over context ranks (each rank's gradient is its slice's share) averaged over data ranks.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist


def _size(group: Optional[Any]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group: Optional[Any]) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_to_all(x: torch.Tensor, group: Any, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` into cp chunks along ``scatter_dim``, send chunk j to rank j, and concatenate what
    arrives (in rank order) along ``gather_dim``."""
    n = _size(group)
    send = torch.stack(x.chunk(n, dim=scatter_dim), dim=0).contiguous()  # (cp, ...chunk)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):  # type: ignore[override]
        ctx.args = (group, scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        group, scatter_dim, gather_dim = ctx.args
        return _all_to_all(g, group, gather_dim, scatter_dim), None, None, None  # the adjoint swaps the dims


def seq_to_heads(x: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    """(B, T/cp, N, D) -> (B, T, N/cp, D): the whole sequence, this rank's share of the heads."""
    return x if _size(group) == 1 else _AllToAll.apply(x, group, 2, 1)


def heads_to_seq(x: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    """(B, T, N/cp, D) -> (B, T/cp, N, D): back to this rank's tokens, all heads."""
    return x if _size(group) == 1 else _AllToAll.apply(x, group, 1, 2)


def context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Optional[Any],
                      attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Causal attention over the whole sequence from per-rank slices.

    q (B, T/cp, H, D), k/v (B, T/cp, K, D), already rotated with their global positions; query head h
    uses KV head h // (H/K). ``attend(q, k, v)`` takes and returns (B, heads, T, D) tensors (the model's
    SDPA call). Returns (B, T/cp, H, D)."""
    cp = _size(group)
    if cp == 1:
        return attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    n_kv = k.shape[2]
    if n_kv % cp:
        # fewer KV heads than ranks (validate_sequence_split guarantees cp % K == 0): rank c's
        # query heads [c H/cp, (c+1) H/cp) all use KV head c // (cp/K), which is copy c of the repeat.
        k, v = k.repeat_interleave(cp // n_kv, dim=2), v.repeat_interleave(cp // n_kv, dim=2)
    q, k, v = seq_to_heads(q, group), seq_to_heads(k, group), seq_to_heads(v, group)  # (B, T, ·/cp, D)
    y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H/cp, T, D)
    return heads_to_seq(y.transpose(1, 2), group)  # (B, T/cp, H, D)


class _ContextSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.cp = _size(group)
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        # DeepSpeed averages gradients over data x context ranks; the true gradient sums the context
        # ranks' shares, so each share is scaled by cp before that average (Megatron does the same).
        return g * ctx.cp, None


def context_mean(local_mean: torch.Tensor, labels: torch.Tensor, group: Optional[Any],
                 ignore_index: int = -100) -> torch.Tensor:
    """The token-weighted mean over the whole sequence from this rank's mean over its own ``labels``
    slice (a rank whose tokens are all ignored contributes nothing, never NaN)."""
    if _size(group) == 1:
        return local_mean
    n_local = (labels != ignore_index).sum().to(local_mean.dtype)
    n_total = n_local.detach().clone()
    dist.all_reduce(n_total, group=group)
    return _ContextSum.apply(local_mean * (n_local / n_total.clamp(min=1)), group)


def context_slice(x: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This context rank's contiguous slice of dimension 1 of (B, T, ...) (tokens or already-shifted
    labels: the label of a slice's last token is the next slice's first token, which the data
    loader's shift put there before slicing)."""
    if size == 1:
        return x
    t = x.shape[1]
    if t % size:
        from megatrain.config import ConfigError

        raise ConfigError(f"sequence length {t} is not divisible by parallel.context={size}")
    n = t // size
    return x[:, rank * n:(rank + 1) * n]


class _GatherContext(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        from megatrain.parallel.mappings import _gather_seq

        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        from megatrain.parallel.mappings import _split_seq

        return _split_seq(g, ctx.group), None


def gather_context(x: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    """(B, T/cp, ...) from every context rank -> (B, T, ...), the same on every rank (for outputs such as
    logits; backward keeps this rank's slice of the gradient)."""
    return x if _size(group) == 1 else _GatherContext.apply(x, group)


def context_rank_size(group: Optional[Any]) -> tuple[int, int]:
    return _rank(group), _size(group)
