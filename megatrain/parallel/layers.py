"""Tensor-parallel layers (Megatron-style), with weights stored in their *canonical* shape.

Every TP-split parameter carries three attributes:

- ``tensor_model_parallel = True`` (DeepSpeed counts it once per TP rank in the grad norm),
- ``partition_dim``: the dimension of the canonical (unsplit) tensor that is cut into
  ``tp_size`` contiguous chunks, rank ``r`` holding chunk ``r``,
- ``full_shape``: the canonical shape.

Weights may have more than two dimensions so that the split falls on whole
heads or whole FFN columns whatever the TP size: a fused QKV weight is
``(kv_heads, q_per_kv + 2, head_dim, C)`` split on dim 0, a fused SwiGLU
gate/up weight ``(2, ffn, C)`` split on dim 1. The GEMM sees the weight
flattened to ``(out, in)``. Because the canonical layout does not depend on the
TP size, initialisation, checkpoints and conversion are TP-invariant.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatrain.parallel.mappings import (copy_to_tp, gather_from_tp, gather_seq, reduce_from_tp, reduce_scatter_seq,
                                        scatter_to_tp)


def tp_info(group: Optional[Any]) -> tuple[int, int]:
    """(rank, size) of this process in a TP group; (0, 1) without one."""
    if group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def mark_tp(param: nn.Parameter, partition_dim: Optional[int], full_shape: Sequence[int],
            tp_rank: int = 0) -> nn.Parameter:
    param.tensor_model_parallel = partition_dim is not None  # type: ignore[attr-defined]
    param.partition_dim = partition_dim  # type: ignore[attr-defined]
    param.full_shape = tuple(full_shape)  # type: ignore[attr-defined]
    param.tp_rank = tp_rank if partition_dim is not None else 0  # type: ignore[attr-defined]
    return param


def shard_of(full: torch.Tensor, partition_dim: Optional[int], rank: int, size: int) -> torch.Tensor:
    """This rank's chunk of a canonical tensor."""
    if partition_dim is None or size == 1:
        return full
    return full.chunk(size, dim=partition_dim)[rank]


def _split_shape(shape: Sequence[int], dim: int, size: int, what: str) -> tuple[int, ...]:
    if shape[dim] % size:
        raise ValueError(f"{what}: dimension {dim} of {tuple(shape)} is not divisible by the TP size {size}")
    out = list(shape)
    out[dim] //= size
    return tuple(out)


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its output dimension: A = [A_1; ...; A_p].

    Rank ``i`` holds A_i and computes Y_i = X A_i^T; the input X is replicated on
    every TP rank (``copy_to_tp``: identity forward, all-reduce of dX backward).
    With ``gather_output`` the Y_i are all-gathered into Y; otherwise each rank
    keeps its Y_i, which is what a following RowParallelLinear expects. With
    ``sequence_parallel`` X arrives as this rank's T/p tokens and is all-gathered
    along the sequence first (reduce-scatter of dX backward).

    ``out_shape`` gives the canonical output structure (e.g. ``(kv_heads, q_per_kv + 2, head_dim)``);
    ``split_dim`` is the axis of it that is cut. The weight is ``(*out_shape_local, in_features)``.
    """

    def __init__(self, in_features: int, out_shape: Sequence[int] | int, *, tp_group: Optional[Any] = None,
                 split_dim: int = 0, bias: bool = False, gather_output: bool = False,
                 init_std: float = 0.02, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None, sequence_parallel: bool = False):
        super().__init__()
        out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.tp_rank, self.tp_size = tp_info(tp_group)
        self.in_features, self.gather_output, self.init_std = in_features, gather_output, init_std
        local = _split_shape(out_shape, split_dim, self.tp_size, type(self).__name__)
        self.out_features_local, self.in_features_local = math.prod(local), in_features
        self.fp8_gemm: Optional[Callable] = None  # set by megatrain.parallelize (FP8): the local GEMM
        self.weight = mark_tp(nn.Parameter(torch.empty(*local, in_features, dtype=dtype, device=device)),
                              split_dim, (*out_shape, in_features), self.tp_rank)
        self.bias = None
        if bias:
            self.bias = mark_tp(nn.Parameter(torch.zeros(*local, dtype=dtype, device=device)), split_dim, out_shape,
                                self.tp_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T or T/p, C) -> (B, T, out/p)
        x = gather_seq(x, self.tp_group) if self.sequence_parallel else copy_to_tp(x, self.tp_group)
        b = None if self.bias is None else self.bias.view(-1)
        if self.fp8_gemm is not None:
            y = self.fp8_gemm(x, self.weight)  # (..., out_local), casts per shard; communication stays bf16
            y = y if b is None else y + b
        else:
            y = F.linear(x, self.weight.view(self.out_features_local, self.in_features), b)
        return gather_from_tp(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split along its input dimension: A = [A_1, ..., A_p].

    Rank ``i`` holds the columns A_i and the matching slice X_i of the input's last
    dimension (``input_is_parallel``: it comes straight from a ColumnParallelLinear;
    otherwise X is scattered here). Partial products X_i A_i^T are all-reduced
    (``reduce_from_tp``), then the replicated bias is added once. With
    ``sequence_parallel`` the partial products are reduce-scattered along the
    sequence instead, so each rank leaves with the summed Y for its T/p tokens.
    """

    def __init__(self, in_features: int, out_features: int, *, tp_group: Optional[Any] = None,
                 bias: bool = False, input_is_parallel: bool = True, init_std: float = 0.02,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
                 sequence_parallel: bool = False):
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.tp_rank, self.tp_size = tp_info(tp_group)
        self.input_is_parallel, self.init_std = input_is_parallel, init_std
        local = _split_shape((out_features, in_features), 1, self.tp_size, type(self).__name__)
        self.out_features_local, self.in_features_local = local
        self.fp8_gemm: Optional[Callable] = None  # set by megatrain.parallelize (FP8): the local GEMM
        self.weight = mark_tp(nn.Parameter(torch.empty(*local, dtype=dtype, device=device)), 1,
                              (out_features, in_features), self.tp_rank)
        self.bias = None
        if bias:
            self.bias = mark_tp(nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)), None,
                                (out_features,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.tp_group)
        local = F.linear(x, self.weight) if self.fp8_gemm is None else self.fp8_gemm(x, self.weight)
        # (B, T, out) partial sum over this rank's input slice; bf16 communication, FP8 or not
        y = reduce_scatter_seq(local, self.tp_group) if self.sequence_parallel else reduce_from_tp(local, self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding table E (V, C) split along the vocabulary: rank ``i`` holds rows
    [i V/p, (i+1) V/p). Each rank looks up the ids that fall in its range (others
    give zero rows), and an all-reduce sums the partial results (a reduce-scatter
    along the sequence with ``sequence_parallel``: each rank keeps T/p tokens)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group: Optional[Any] = None,
                 init_std: float = 0.02, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None, sequence_parallel: bool = False):
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.tp_rank, self.tp_size = tp_info(tp_group)
        self.num_embeddings, self.init_std = num_embeddings, init_std
        local = _split_shape((num_embeddings, embedding_dim), 0, self.tp_size, type(self).__name__)
        self.vocab_start = self.tp_rank * local[0]
        self.vocab_end = self.vocab_start + local[0]
        self.weight = mark_tp(nn.Parameter(torch.empty(*local, dtype=dtype, device=device)), 0,
                              (num_embeddings, embedding_dim), self.tp_rank)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (B, T, C) partial
        if self.sequence_parallel:
            return reduce_scatter_seq(out, self.tp_group)  # (B, T/p, C)
        return reduce_from_tp(out, self.tp_group)


@torch.no_grad()
def init_tp_param(param: nn.Parameter, std: float, key: str, seed: int) -> None:
    """Fill a (possibly TP-split) parameter with N(0, std) drawn for its *canonical* tensor
    from a generator seeded by (seed, key), then keep this rank's chunk.

    The key names the parameter independently of how the model is cut (``block3.attn.qkv.weight``),
    so TP, PP and DP layouts start from identical weights.
    """
    full_shape = getattr(param, "full_shape", tuple(param.shape))
    dim = getattr(param, "partition_dim", None)
    device = param.device if param.device.type != "meta" else torch.device("cpu")
    gen = torch.Generator(device=device)
    gen.manual_seed(_stable_seed(seed, key))
    full = torch.empty(full_shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=gen)
    size = 1 if dim is None else full_shape[dim] // param.shape[dim]
    param.copy_(shard_of(full, dim, getattr(param, "tp_rank", 0), size).to(param.dtype))


def _stable_seed(seed: int, key: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
