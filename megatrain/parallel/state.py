"""ParallelState: this rank's place in the (pipeline, data, tensor) grid and the process groups.

Rank layout, innermost first: ``rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank``.

Why this order: tensor parallelism all-reduces activations twice per layer in the
forward pass and twice in the backward pass, so its ranks must be the closest
(same node, NVLink). Data parallelism reduces gradients once per step and can
overlap that with the backward pass, so it comes next. Pipeline parallelism only
sends one activation tensor between neighbouring stages per micro-batch, so it
tolerates the slowest links and is outermost. DeepSpeed's
``PipeModelDataParallelTopology`` uses the same order (axes pipe, data, model),
so its groups and ours name the same ranks.

The object is passed explicitly to whatever needs a group (no module globals),
and it quacks like the ``mpu`` that DeepSpeed accepts, so ZeRO reduces gradients
over the data-parallel group only.
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
    tp_group: Any = field(default=None, repr=False)
    dp_group: Any = field(default=None, repr=False)
    pp_group: Any = field(default=None, repr=False)
    # model-parallel group = TP x PP ranks that hold one replica's shards (what DeepSpeed calls "model parallel"
    # for gradient-norm reduction).
    mp_group: Any = field(default=None, repr=False)
    tp_ranks: list[int] = field(default_factory=list)
    dp_ranks: list[int] = field(default_factory=list)
    pp_ranks: list[int] = field(default_factory=list)

    # --------------------------------------------------------------- construction

    @classmethod
    def single(cls) -> "ParallelState":
        """One process, no communication (tests, conversion tools, inference)."""
        return cls(world_size=1, rank=0, tp_size=1, pp_size=1, tp_ranks=[0], dp_ranks=[0], pp_ranks=[0])

    @classmethod
    def build(cls, tp_size: int = 1, pp_size: int = 1) -> "ParallelState":
        """Create every group of the grid. Collective: all ranks must call it with the same sizes."""
        from megatrain.config import ConfigError

        world, rank = dist.get_world_size(), dist.get_rank()
        if world % (tp_size * pp_size):
            raise ConfigError(f"world size {world} is not divisible by parallel.tensor x parallel.pipeline = "
                              f"{tp_size} x {pp_size}")
        dp_size = world // (tp_size * pp_size)
        st = cls(world_size=world, rank=rank, tp_size=tp_size, pp_size=pp_size)
        # new_group is collective over the whole world, so every rank creates every group in the same order.
        for ranks in grid_groups(world, tp_size, pp_size, "tp"):
            g = dist.new_group(ranks)
            if rank in ranks:
                st.tp_group, st.tp_ranks = g, ranks
        for ranks in grid_groups(world, tp_size, pp_size, "dp"):
            g = dist.new_group(ranks)
            if rank in ranks:
                st.dp_group, st.dp_ranks = g, ranks
        for ranks in grid_groups(world, tp_size, pp_size, "pp"):
            g = dist.new_group(ranks)
            if rank in ranks:
                st.pp_group, st.pp_ranks = g, ranks
        for ranks in grid_groups(world, tp_size, pp_size, "mp"):
            g = dist.new_group(ranks)
            if rank in ranks:
                st.mp_group = g
        assert dp_size == len(st.dp_ranks)
        return st

    # --------------------------------------------------------------- coordinates

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp_size * self.pp_size)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp_size) % self.dp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp_size * self.dp_size)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp_size} "
                f"dp {self.dp_rank}/{self.dp_size} pp {self.pp_rank}/{self.pp_size}")

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

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_group(self) -> Optional[Any]:
        return self.dp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp_size

    def get_pipeline_model_parallel_group(self) -> Optional[Any]:
        return self.pp_group


def grid_groups(world: int, tp: int, pp: int, kind: str) -> list[list[int]]:
    """The rank lists of every group of one kind in the (pp, dp, tp) grid."""
    dp = world // (tp * pp)

    def r(p: int, d: int, t: int) -> int:
        return p * dp * tp + d * tp + t

    if kind == "tp":
        return [[r(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)]
    if kind == "dp":
        return [[r(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)]
    if kind == "pp":
        return [[r(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)]
    if kind == "mp":
        return [[r(p, d, t) for p in range(pp) for t in range(tp)] for d in range(dp)]
    raise ValueError(kind)
