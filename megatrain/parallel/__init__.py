"""Parallel state, tensor- and sequence-parallel layers, mappings, the vocab-parallel loss and Ulysses
context parallelism."""

from megatrain.parallel.cross_entropy import (IGNORE_INDEX, fused_linear_cross_entropy, masked_mean,
                                              vocab_parallel_cross_entropy)
from megatrain.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                       init_tp_param, shard_of)
from megatrain.parallel.context import context_attention, context_mean, context_slice, gather_context
from megatrain.parallel.mappings import (copy_to_tp, gather_from_tp, gather_seq, reduce_from_tp, reduce_scatter_seq,
                                        scatter_to_tp)
from megatrain.parallel.random import RNGTracker
from megatrain.parallel.state import ParallelState

__all__ = [
    "IGNORE_INDEX", "ColumnParallelLinear", "ParallelState", "RNGTracker", "RowParallelLinear",
    "VocabParallelEmbedding", "context_attention", "context_mean", "context_slice", "copy_to_tp",
    "fused_linear_cross_entropy", "gather_context", "gather_from_tp", "gather_seq", "init_tp_param", "masked_mean",
    "reduce_from_tp", "reduce_scatter_seq", "scatter_to_tp", "shard_of", "vocab_parallel_cross_entropy",
]
