"""ParallelState: this rank's place in the (pipeline, data, context, tensor) grid and the process groups.

Rank layout, innermost first:
``rank = pp_rank * (dp * cp * tp) + dp_rank * (cp * tp) + cp_rank * tp + tp_rank``.

Why this order: tensor parallelism all-reduces (or, with sequence parallelism,
all-gathers and reduce-scatters) the full hidden state twice per layer in each
direction, so its ranks must be the closest (same node, NVLink). Context
parallelism (Ulysses) moves q, k, v and the attention output through an
all-to-all once per layer and direction, each rank sending only (cp-1)/cp of
its slice, so it comes next. Data parallelism reduces gradients once per step and
can overlap that with the backward pass. Pipeline parallelism only sends one
activation tensor between neighbouring stages per micro-batch, so it tolerates
the slowest links and is outermost. Megatron-LM orders its axes the same way
(tp, cp, dp, pp).

DeepSpeed's ``PipeModelDataParallelTopology`` has the axes (pipe, data, model):
with our order its ``data`` axis is exactly our data x context ranks (rank
``dp_rank * cp + cp_rank`` within a TP slice), so its groups and ours name the
same ranks.

Two notions of "data parallel":

- ``dp_*`` (attributes, ``dp_rank``/``dp_size``/``dp_group``): the ranks that see
  *different samples*. The data loader shards samples over these, and means of
  per-sample metrics are taken over them.
- the ``mpu`` methods ``get_data_parallel_*``: data x context ranks, for DeepSpeed.
  Every rank of one context group holds the same weights and computes gradients
  for its own slice of the same sequences, so gradients must be reduced over
  data x context ranks and ZeRO may shard over all of them (as in Megatron). The
  loss makes DeepSpeed's *average* over that group come out right (see
  :func:`megatrain.parallel.context.context_mean`).

The object is passed explicitly to whatever needs a group (no module globals),
and it quacks like the ``mpu`` that DeepSpeed accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch.distributed as dist


@dataclass
class ParallelState:
    world_size: int
    rank: int
    tp_size: int
    pp_size: int
    cp_size: int = 1
    tp_group: Any = field(default=None, repr=False)
    dp_group: Any = field(default=None, repr=False)
    pp_group: Any = field(default=None, repr=False)
    cp_group: Any = field(default=None, repr=False)
    # data x context ranks of one (pp, tp) slice: what DeepSpeed reduces gradients over and ZeRO shards over
    dp_cp_group: Any = field(default=None, repr=False)
    # model-parallel group = TP x PP ranks that hold one replica's shards (what DeepSpeed calls "model parallel"
    # for gradient-norm reduction).
    mp_group: Any = field(default=None, repr=False)
    tp_ranks: list[int] = field(default_factory=list)
    dp_ranks: list[int] = field(default_factory=list)
    pp_ranks: list[int] = field(default_factory=list)
    cp_ranks: list[int] = field(default_factory=list)

    # --------------------------------------------------------------- construction

    @classmethod
    def single(cls) -> "ParallelState":
        """One process, no communication (tests, conversion tools, inference)."""
        return cls(world_size=1, rank=0, tp_size=1, pp_size=1, tp_ranks=[0], dp_ranks=[0], pp_ranks=[0],
                   cp_ranks=[0])

    @classmethod
    def build(cls, tp_size: int = 1, pp_size: int = 1, cp_size: int = 1) -> "ParallelState":
        """Create every group of the grid. Collective: all ranks must call it with the same sizes."""
        from megatrain.config import ConfigError

        world, rank = dist.get_world_size(), dist.get_rank()
        if world % (tp_size * pp_size * cp_size):
            raise ConfigError(f"world size {world} is not divisible by parallel.tensor x parallel.context x "
                              f"parallel.pipeline = {tp_size} x {cp_size} x {pp_size}")
        st = cls(world_size=world, rank=rank, tp_size=tp_size, pp_size=pp_size, cp_size=cp_size)
        # new_group is collective over the whole world, so every rank creates every group in the same order.
        for kind, group_attr, ranks_attr in (("tp", "tp_group", "tp_ranks"), ("dp", "dp_group", "dp_ranks"),
                                             ("pp", "pp_group", "pp_ranks"), ("mp", "mp_group", None),
                                             ("cp", "cp_group", "cp_ranks"), ("dp_cp", "dp_cp_group", None)):
            for ranks in grid_groups(world, tp_size, pp_size, kind, cp_size):
                g = dist.new_group(ranks)
                if rank in ranks:
                    setattr(st, group_attr, g)
                    if ranks_attr:
                        setattr(st, ranks_attr, ranks)
        return st

    # --------------------------------------------------------------- coordinates

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp_size * self.pp_size * self.cp_size)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def cp_rank(self) -> int:
        return (self.rank // self.tp_size) % self.cp_size

    @property
    def dp_rank(self) -> int:
        return (self.rank // (self.tp_size * self.cp_size)) % self.dp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp_size * self.cp_size * self.dp_size)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp_size} "
                f"cp {self.cp_rank}/{self.cp_size} dp {self.dp_rank}/{self.dp_size} pp {self.pp_rank}/{self.pp_size}")

    # --------------------------------------------------------------- DeepSpeed mpu protocol

    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_model_parallel_group(self) -> Optional[Any]:
        return self.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    # DeepSpeed's "data parallel" is data x context (see the module docstring). DeepSpeed's own Ulysses
    # protocol (get_sequence_parallel_* / get_sequence_data_parallel_*) is deliberately not offered: its
    # plain engine and ZeRO would then sum over context ranks, but its pipeline engine ignores it and
    # averages (runtime/engine.py, _reduce_non_expert_gradients), so one rule for all paths is the average.

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank * self.cp_size + self.cp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size * self.cp_size

    def get_data_parallel_group(self) -> Optional[Any]:
        return self.dp_cp_group if self.cp_size > 1 else self.dp_group

    def get_context_parallel_rank(self) -> int:
        return self.cp_rank

    def get_context_parallel_world_size(self) -> int:
        return self.cp_size

    def get_context_parallel_group(self) -> Optional[Any]:
        return self.cp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp_size

    def get_pipeline_model_parallel_group(self) -> Optional[Any]:
        return self.pp_group


def grid_groups(world: int, tp: int, pp: int, kind: str, cp: int = 1) -> list[list[int]]:
    """The rank lists of every group of one kind in the (pp, dp, cp, tp) grid."""
    dp = world // (tp * pp * cp)

    def r(p: int, d: int, c: int, t: int) -> int:
        return ((p * dp + d) * cp + c) * tp + t

    P, D, C, T = range(pp), range(dp), range(cp), range(tp)
    if kind == "tp":
        return [[r(p, d, c, t) for t in T] for p in P for d in D for c in C]
    if kind == "cp":
        return [[r(p, d, c, t) for c in C] for p in P for d in D for t in T]
    if kind == "dp":
        return [[r(p, d, c, t) for d in D] for p in P for c in C for t in T]
    if kind == "dp_cp":
        return [[r(p, d, c, t) for d in D for c in C] for p in P for t in T]
    if kind == "pp":
        return [[r(p, d, c, t) for p in P] for d in D for c in C for t in T]
    if kind == "mp":  # one replica's shards: TP x PP (context ranks hold the same weights as each other)
        return [[r(p, d, c, t) for p in P for t in T] for d in D for c in C]
    raise ValueError(kind)
