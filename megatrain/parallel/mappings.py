"""Autograd functions that move activations into and out of the tensor-parallel region.

Each forward collective has the adjoint collective in backward:

| function            | forward                          | backward                      |
|---------------------|----------------------------------|-------------------------------|
| copy_to_tp          | identity                         | all-reduce (sum)              |
| reduce_from_tp      | all-reduce (sum)                 | identity                      |
| scatter_to_tp       | keep this rank's last-dim slice  | all-gather along the last dim |
| gather_from_tp      | all-gather along the last dim    | keep this rank's slice        |
| gather_seq          | all-gather along the sequence    | reduce-scatter along it       |
| reduce_scatter_seq  | reduce-scatter along the sequence| all-gather along it           |

The ``*_seq`` functions are Megatron's sequence-parallel pair (Korthikanti et al.
2022): between the TP regions each rank holds T/p tokens, an all-gather enters a
column-parallel region and a reduce-scatter leaves a row-parallel one, the same
bytes as the all-reduce they replace (an all-reduce *is* a reduce-scatter plus an
all-gather) but with the norms and residual adds done on T/p tokens. The
sequence is dimension 1 of (B, T, ...) tensors; the collectives run on a
sequence-first contiguous copy so each rank's part is one contiguous block.

With a group of size 1 (or ``None``) every function is the identity, so the
model runs unchanged in a single process.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


# torch 2.13 renamed the flat-tensor collectives (the old names warn); same semantics
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _size(group: Optional[Any]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split_last(x: torch.Tensor, group: Any) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    return x.chunk(n, dim=-1)[dist.get_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group: Any) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _gather_seq(x: torch.Tensor, group: Any) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    xs = x.movedim(1, 0).contiguous()  # (T/p, B, ...)
    out = xs.new_empty((n * xs.shape[0], *xs.shape[1:]))
    _ALL_GATHER(out, xs, group=group)
    return out.movedim(0, 1)  # (B, T, ...)


def _reduce_scatter_seq(x: torch.Tensor, group: Any) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[1] % n:
        raise ValueError(f"sequence parallelism: sequence length {x.shape[1]} is not divisible by the TP size {n}")
    xs = x.movedim(1, 0).contiguous()  # (T, B, ...)
    out = xs.new_empty((xs.shape[0] // n, *xs.shape[1:]))
    _REDUCE_SCATTER(out, xs, group=group)
    # contiguous: this is the residual stream, which the pipeline engine sends between stages as is
    return out.movedim(0, 1).contiguous()  # (B, T/p, ...)


def _split_seq(x: torch.Tensor, group: Any) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[1] % n:
        raise ValueError(f"sequence parallelism: sequence length {x.shape[1]} is not divisible by the TP size {n}")
    return x.chunk(n, dim=1)[dist.get_rank(group)].contiguous()


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return _reduce_scatter_seq(g, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return _gather_seq(g, ctx.group), None


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return _all_reduce(g.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        return _all_reduce(x.clone() if _size(group) > 1 else x, group)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return _gather_last(g, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return _split_last(g, ctx.group), None


def copy_to_tp(x: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    return x if _size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    return x if _size(group) == 1 else _GatherFromTP.apply(x, group)


def gather_seq(x: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    """(B, T/p, ...) -> (B, T, ...): enter a column-parallel region under sequence parallelism."""
    return x if _size(group) == 1 else _GatherSeq.apply(x, group)


def reduce_scatter_seq(x: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    """(B, T, ...) partial sums -> (B, T/p, ...) summed: leave a row-parallel region under SP."""
    return x if _size(group) == 1 else _ReduceScatterSeq.apply(x, group)


def all_reduce_tp(x: torch.Tensor, group: Optional[Any], op: Any = None) -> torch.Tensor:
    """Non-differentiable in-place all-reduce (used inside the vocab-parallel loss)."""
    if _size(group) > 1:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM, group=group)
    return x
