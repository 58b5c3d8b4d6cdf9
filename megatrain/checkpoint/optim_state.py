"""The portable AdamW state: moments (and fp32 masters) under canonical parameter names.

``optim/tpXX_ppYY.safetensors`` holds, for each canonical name of that TP/PP shard, ``NAME/exp_avg``,
``NAME/exp_avg_sq`` and, unless the run is fp32, ``NAME/fp32`` (the master weight), each gathered
over the data-parallel ranks. Reading merges the TP slices and re-cuts them for the new TP size, so
the state resumes at any TP / PP / DP size and ZeRO stage.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from megatrain.checkpoint import layout
from megatrain.checkpoint.layout import CheckpointError
from megatrain.engine import internals
from megatrain.files import atomic_path

OPTIM_DIR = "optim"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def optim_path(ckpt_dir: Path, tp_rank: int, pp_rank: int) -> Path:
    return ckpt_dir / OPTIM_DIR / f"tp{tp_rank:02d}_pp{pp_rank:02d}.safetensors"


def gather_state(params: dict[str, torch.nn.Parameter], opt: Any, with_fp32: bool) -> dict[str, torch.Tensor]:
    """``{NAME/key: full tensor}`` of this TP/PP shard; collective over DP (same order on every rank)."""
    internals.relink_lazy_state(opt, now=True)
    keys = list(ADAM_KEYS) + ([None] if with_fp32 else [])
    out = {}
    for name, p in params.items():
        for key in keys:
            out[f"{name}/{key or 'fp32'}"] = internals.full_state(p, opt, key)
    return out


def write_state(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    from megatrain.files import save_safetensors

    with atomic_path(path, fsync=False) as tmp:  # the save's hashing pass fsyncs every file
        save_safetensors({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def read_state(path: Path, meta: dict, names: list[str], tp_rank: int, tp: int,
               with_fp32: bool) -> dict[str, torch.Tensor]:
    """``{name/key: tensor}`` for this TP rank of ``tp``, merged from the saved TP slices and re-cut."""
    from safetensors import safe_open

    old_tp = int(meta["topology"]["tp"])
    where: dict[str, dict[int, Any]] = {}
    for f in sorted((path / OPTIM_DIR).glob("tp*_pp*.safetensors")):
        h = safe_open(str(f), framework="pt")
        if (h.metadata() or {}).get("tp") != str(old_tp):
            raise CheckpointError(f"{f}: written for tp={(h.metadata() or {}).get('tp')}, but {layout.META} says "
                                  f"tp={old_tp}; the directory mixes two checkpoints")
        t = int(re.match(r"tp(\d+)_pp\d+\.safetensors$", f.name).group(1))
        for k in h.keys():  # noqa: SIM118 - a safetensors handle, not a dict
            where.setdefault(k, {})[t] = h
    dims = {n: d for n, (_, d) in layout.model_layout(layout.model_config_of(meta, path)).items()}
    out = {}
    for name in names:
        for key in list(ADAM_KEYS) + (["fp32"] if with_fp32 else []):
            k = f"{name}/{key}"
            slices = where.get(k, {})
            if sorted(slices) != list(range(old_tp)):
                raise CheckpointError(f"{path / OPTIM_DIR}: optimizer state {k} is missing for TP rank(s) "
                                      f"{sorted(set(range(old_tp)) - set(slices))}; the checkpoint is incomplete")
            parts = [slices[t].get_tensor(k) for t in range(old_tp)]
            d = dims[name]
            full = torch.cat(parts, dim=d) if d is not None else parts[0]
            out[k] = full.chunk(tp, dim=d)[tp_rank].contiguous() if d is not None and tp > 1 else full
    return out
