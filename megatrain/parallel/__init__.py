"""Parallel state, tensor-parallel layers, mappings and the vocab-parallel loss."""

from megatrain.parallel.cross_entropy import (IGNORE_INDEX, fused_linear_cross_entropy, masked_mean,
                                              vocab_parallel_cross_entropy)
from megatrain.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                       init_tp_param, shard_of)
from megatrain.parallel.mappings import copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp
from megatrain.parallel.random import RNGTracker
from megatrain.parallel.state import ParallelState

__all__ = [
    "IGNORE_INDEX", "ColumnParallelLinear", "ParallelState", "RNGTracker", "RowParallelLinear",
    "VocabParallelEmbedding", "copy_to_tp", "fused_linear_cross_entropy", "gather_from_tp", "init_tp_param",
    "masked_mean", "reduce_from_tp", "scatter_to_tp", "shard_of", "vocab_parallel_cross_entropy",
]
