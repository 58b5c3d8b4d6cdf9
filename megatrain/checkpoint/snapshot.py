"""The part of a save that stops training: a copy of this rank's state in host memory.

A snapshot holds everything one rank writes, so the files can be written while training goes on:

- ``model/tpXX_ppYY.safetensors`` (DP rank 0 of each TP/PP shard): the weights under canonical names,
  in the training dtype. In fp32 these ARE the fp32 master weights, which are therefore not stored
  a second time;
- ``optim/tpXX_ppYY.safetensors`` (same ranks): ``NAME/exp_avg``, ``NAME/exp_avg_sq`` and, for bf16 and
  fp16 runs, ``NAME/fp32`` (the master), each gathered over the data-parallel ranks (collective);
- ``rng/rankNNNNN.pt`` (every rank), already serialised (a few KB);
- on rank 0 the content of ``meta.json``, built now because the counters it records move on.

Copies go into a :class:`HostPool` of buffers kept from one save to the next (pinned when the state
lives on a GPU, so the device-to-host copies run at full speed and one synchronisation ends them).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megatrain.checkpoint import layout
from megatrain.checkpoint.compat import schedule_fingerprint, topology_of
from megatrain.checkpoint.optim_state import ADAM_KEYS, OPTIM_DIR
from megatrain.checkpoint.parts import Progress, RunParts
from megatrain.checkpoint.rng import rng_state
from megatrain.engine import internals
from megatrain.model.names import canonical_named_parameters

@dataclass
class Snapshot:
    """What one rank writes for one checkpoint: tensors per file (host memory), small files as bytes."""

    step: int
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # relpath -> {name: tensor}
    tensor_meta: dict[str, dict[str, str]] = field(default_factory=dict)  # relpath -> safetensors metadata
    blobs: dict[str, bytes] = field(default_factory=dict)  # relpath -> content
    meta: Optional[dict] = None  # rank 0: meta.json

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.tensors.values() for t in ts.values()) + \
            sum(len(b) for b in self.blobs.values())


class HostPool:
    """Host buffers reused across saves (an asynchronous save must not allocate GBs at every save).
    A buffer is overwritten by the next snapshot, so the previous write must be finished by then."""

    def __init__(self, keep: bool):
        self.keep = keep  # False (synchronous saves): fresh copies, freed once written
        self._bufs: dict[str, torch.Tensor] = {}
        self._pending_device = False

    def copy(self, key: str, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if not self.keep:
            return t.to("cpu", copy=True).contiguous()
        buf = self._bufs.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            self._bufs[key] = buf
        buf.copy_(t, non_blocking=t.is_cuda)
        self._pending_device |= t.is_cuda
        return buf

    def finish(self) -> None:
        """Wait for the device-to-host copies started by :meth:`copy`."""
        if self._pending_device:
            torch.cuda.synchronize()
            self._pending_device = False


def shard_rel(sub: str, tp_rank: int, pp_rank: int) -> str:
    return f"{sub}/tp{tp_rank:02d}_pp{pp_rank:02d}.safetensors"


def take_snapshot(ck: RunParts, progress: Progress, pool: HostPool) -> Snapshot:
    """Every rank, at the same step (collective over DP under ZeRO). Returns this rank's share."""
    st, cfg = ck.st, ck.cfg
    params = canonical_named_parameters(ck.engine.module, cfg.model)
    writer = st.dp_rank == 0 and st.cp_rank == 0  # one writer per (TP, PP) shard: context ranks hold the same
    snap = Snapshot(progress.step)
    shard_md = {"tp_rank": str(st.tp_rank), "pp_rank": str(st.pp_rank), "tp": str(st.tp_size),
                "pp": str(st.pp_size), "format": "pt"}
    model = _model_tensors(ck, params, pool if writer else None)
    opt = ck.engine.optimizer
    optimizer_step = internals.optimizer_step_count(opt)
    optim = _optim_tensors(params, opt, cfg.train.precision != "fp32", pool if writer else None) \
        if optimizer_step else {}
    pool.finish()
    if writer:
        snap.tensors[shard_rel(layout.MODEL_DIR, st.tp_rank, st.pp_rank)] = model
        snap.tensor_meta[shard_rel(layout.MODEL_DIR, st.tp_rank, st.pp_rank)] = shard_md
        if optim:
            rel = shard_rel(OPTIM_DIR, st.tp_rank, st.pp_rank)
            snap.tensors[rel] = optim
            snap.tensor_meta[rel] = {"step": str(optimizer_step), "tp": str(st.tp_size), "pp": str(st.pp_size)}
    buf = io.BytesIO()
    torch.save(rng_state(ck.rng_tracker), buf)
    snap.blobs[f"rng/rank{st.rank:05d}.pt"] = buf.getvalue()
    if st.rank == 0:
        snap.meta = build_meta(ck, progress, optimizer_step)
    return snap


def _model_tensors(ck: RunParts, params: dict, pool: Optional[HostPool]) -> dict[str, torch.Tensor]:
    """This rank's canonical weights (gathered over DP one at a time under ZeRO-3); copied only when
    ``pool`` is given (the writing rank), but every rank takes part in the gathers."""
    out = {}
    if ck.cfg.deepspeed.zero_stage == 3:
        import deepspeed

        for name, p in params.items():  # one at a time: gathering everything at once needs the whole model
            with deepspeed.zero.GatheredParameters([p]):
                if pool is not None:
                    out[name] = pool.copy(f"model/{name}", p)
                    pool.finish()  # the gathered storage is released when the block ends
        return out
    return {n: pool.copy(f"model/{n}", p) for n, p in params.items()} if pool is not None else {}


def _optim_tensors(params: dict, opt: Any, with_fp32: bool, pool: Optional[HostPool]) -> dict[str, torch.Tensor]:
    """``{NAME/key: full fp32 tensor}`` of this TP/PP shard; collective over DP (same order on every rank)."""
    internals.relink_lazy_state(opt, now=True)
    keys = list(ADAM_KEYS) + ([None] if with_fp32 else [])
    out = {}
    for name, p in params.items():
        for key in keys:
            t = internals.full_state_view(p, opt, key)
            if pool is not None:
                k = f"{name}/{key or 'fp32'}"
                # DeepSpeed's gathered copy may be a temporary; freeing it is safe without a sync: the
                # caching allocator hands its memory only to later work on the same stream.
                out[k] = pool.copy(f"optim/{k}", t)
    return out


def build_meta(ck: RunParts, progress: Progress, optimizer_step: int) -> dict[str, Any]:
    import megatrain

    cfg = ck.cfg
    return {
        "format": layout.FORMAT, "version": layout.VERSION, "step": progress.step,
        "consumed_samples": progress.consumed_samples, "weights_only": False, "config": cfg.to_dict(),
        "config_hash": cfg.hash(), "model_hash": cfg.model_hash(),
        "data_fingerprint": ck.fingerprints.get("data"), "tokenizer_sha256": ck.fingerprints.get("tokenizer"),
        "tokenizer_path": cfg.data.tokenizer, "stream": {"seq_len": cfg.train.seq_len, "seed": cfg.train.seed},
        "schedule": schedule_fingerprint(cfg), "topology": topology_of(cfg, ck.st), "dtype": cfg.train.precision,
        "optimizer_step": optimizer_step, "portable_optimizer": True,
        "loss_scaler": internals.loss_scaler_state(ck.engine.optimizer),
        "resilience": ck.guard.state_dict() if ck.guard is not None else None,
        "megatrain_version": megatrain.__version__,
    }
