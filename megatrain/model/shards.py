"""Canonical weights <-> per-rank shards, independent of any checkpoint engine.

A *canonical* state dict uses the parameter names of ``LlamaModel.state_dict()``
(``embed.embed.weight``, ``blocks.3.attn.qkv.weight``, ``norm.weight``,
``head.proj.weight``) with the block index global to the model, and full,
unsplit tensors. A *shard* is what one (tp, pp) rank holds: the canonical
names of the parameters on its pipeline stage, each cut along its partition
dimension into ``tp`` chunks. Resharding is merge then split.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatrain.config import ModelConfig


def partition_dims(cfg: ModelConfig) -> dict[str, Optional[int]]:
    """Canonical name -> the dimension TP splits (None: replicated), read off a model built on 'meta'."""
    from megatrain.model.llama import LlamaModel, Ctx

    model = LlamaModel(cfg, Ctx(device=torch.device("meta")))
    return {n: getattr(p, "partition_dim", None) for n, p in model.named_parameters()}


def block_index(name: str) -> Optional[int]:
    """Global block index of a canonical name, None for embedding / final norm / head."""
    if name.startswith("blocks."):
        return int(name.split(".")[1])
    return None


def split_state_dict(full: dict[str, torch.Tensor], cfg: ModelConfig, tp: int,
                     stage_of: Optional[dict[str, int]] = None) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Cut canonical tensors into {(tp_rank, pp_rank): shard}. ``stage_of`` maps names to a stage
    (default: everything on stage 0)."""
    dims = partition_dims(cfg)
    out: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for name, t in full.items():
        if name not in dims:
            raise KeyError(f"{name}: not a parameter of this model config")
        pp = (stage_of or {}).get(name, 0)
        d = dims[name]
        chunks = t.chunk(tp, dim=d) if d is not None else [t] * tp
        for r in range(tp):
            out.setdefault((r, pp), {})[name] = chunks[r].contiguous()
    return out


def merge_shards(shards: dict[tuple[int, int], dict[str, torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_state_dict`: {(tp_rank, pp_rank): shard} -> canonical tensors.

    Raises ValueError naming the tensor when a TP shard is missing or replicated copies disagree."""
    dims = partition_dims(cfg)
    tp = 1 + max(t for t, _ in shards)
    by_name: dict[str, dict[int, torch.Tensor]] = {}
    for (t, _), sd in shards.items():
        for name, tensor in sd.items():
            by_name.setdefault(name, {})[t] = tensor
    full: dict[str, torch.Tensor] = {}
    for name, parts in by_name.items():
        if name not in dims:
            raise ValueError(f"{name}: not a parameter of this model config")
        if sorted(parts) != list(range(tp)):
            raise ValueError(f"{name}: tensor-parallel shards {sorted(parts)} found, expected 0..{tp - 1}")
        d = dims[name]
        full[name] = torch.cat([parts[r] for r in range(tp)], dim=d) if d is not None else parts[0]
    missing = sorted(set(dims) - set(full))
    if missing:
        raise ValueError(f"missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return full
