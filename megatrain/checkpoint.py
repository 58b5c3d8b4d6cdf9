"""Save and resume: DeepSpeed's engine state plus megatrain's own, written atomically.

A checkpoint directory (layout in ``ckpt_layout``) holds DeepSpeed's shards under ``ds/``
(engine, optimizer and schedule state: the exact-resume path at the same topology),
megatrain's model shards under canonical names (``model/``), the AdamW state under the same
canonical names (``optim/``, ``checkpoint.portable_optimizer``: the exact-resume path at
another TP / PP / DP size or ZeRO stage), per-rank RNG states (``rng/``), ``meta.json``, a
manifest of sizes and SHA-256 hashes, and ``COMPLETE``.

Saving: every rank writes its part into ``.tmp-step_N``; after a barrier the files are hashed
(spread over the ranks) and fsynced, rank 0 writes meta, manifest and ``COMPLETE``, renames the
directory to ``step_N``, fsyncs the parent, moves ``latest`` and prunes. A crash at any point
leaves the previous checkpoints untouched and no loadable partial one.

Resuming (``train.resume``): rank 0 picks the checkpoint and verifies it (manifest, no unlisted
files, no pickled code in DeepSpeed's files), every rank then loads the same one. DeepSpeed's
pickles are loaded with ``weights_only`` forced on, with an allow-list of DeepSpeed's few data
classes; megatrain's own files are safetensors, JSON, or torch files read with ``weights_only=True``.
Checkpoints are still input that must come from a trusted place (see docs/checkpoints.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatrain import ckpt_layout as layout
from megatrain.config import ConfigError

if TYPE_CHECKING:
    from megatrain.trainer import Trainer

log = logging.getLogger(__name__)

CheckpointError = layout.CheckpointError
OPTIM_DIR = "optim"
CRASH_ENV = "MEGATRAIN_TEST_CRASH_AT"  # tests: "PHASE" or "PHASE@STEP" kills the process (SIGKILL) inside save()
SAVE_PHASES = ("start", "ds", "model", "optim", "rng", "hashed", "meta", "manifest", "complete", "renamed",
               "latest", "pruned")
_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def checkpoint_root(tr: "Trainer") -> Path:
    return tr.run_dir / "checkpoints"


def _crash_point(phase: str, step: int) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    name, _, at = spec.partition("@")
    if name == phase and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- what goes in


def local_model_tensors(tr: "Trainer") -> dict[str, torch.Tensor]:
    """This rank's canonical-named parameter shards on CPU (gathered across DP first under ZeRO-3)."""
    from megatrain.model.names import canonical_named_parameters

    params = canonical_named_parameters(tr.engine.module, tr.cfg.model)
    if tr.cfg.deepspeed.zero_stage == 3:
        import deepspeed

        out = {}
        for name, p in params.items():  # one at a time: gathering everything at once needs the whole model
            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.detach().cpu().clone()
        return out
    return {n: p.detach().cpu().clone() for n, p in params.items()}


def rng_state(tr: "Trainer") -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if tr.built.ctx.rng is not None and tr.built.ctx.rng.state is not None:
        state["tp_tracker"] = tr.built.ctx.rng.state
    return state


def restore_rng(tr: "Trainer", state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    if tr.built.ctx.rng is not None and state.get("tp_tracker") is not None:
        tr.built.ctx.rng.state = state["tp_tracker"]


def reseed_rng(tr: "Trainer", step: int) -> None:
    """After a topology change the saved per-rank streams do not map onto the new ranks: start new ones,
    still a function of (seed, step), identical over TP ranks where they must be."""
    seed = tr.cfg.train.seed + step
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if tr.built.ctx.rng is not None:
        tr.built.ctx.rng.seed(seed, tr.st.tp_rank)


def schedule_fingerprint(cfg: Any) -> dict:
    """What decides the learning rate and the AdamW update at every step."""
    o, s = cfg.optimizer, cfg.schedule
    return {"optimizer": {k: getattr(o, k) for k in ("lr", "min_lr", "beta1", "beta2", "eps", "weight_decay",
                                                     "grad_clip")},
            "schedule": {"warmup_steps": s.warmup_steps, "decay": s.decay,
                         "decay_steps": s.decay_steps or cfg.train.max_steps,
                         "wsd_decay_fraction": s.wsd_decay_fraction}}


def topology_of(tr: "Trainer") -> dict:
    st, cfg = tr.st, tr.cfg
    return {"tp": st.tp_size, "pp": st.pp_size, "dp": st.dp_size, "zero_stage": cfg.deepspeed.zero_stage,
            "world_size": st.world_size, "precision": cfg.train.precision, "offload": cfg.deepspeed.offload,
            "pipeline_partition": cfg.parallel.pipeline_partition if st.pp_size > 1 else None}


def build_meta(tr: "Trainer", optimizer_step: int, portable: bool) -> dict[str, Any]:
    import megatrain

    cfg = tr.cfg
    return {
        "format": layout.FORMAT, "version": layout.VERSION, "step": tr.step, "consumed_samples": tr.consumed_samples,
        "weights_only": False, "config": cfg.to_dict(), "config_hash": cfg.hash(), "model_hash": cfg.model_hash(),
        "data_fingerprint": tr.fingerprints.get("data"), "tokenizer_sha256": tr.fingerprints.get("tokenizer"),
        "tokenizer_path": cfg.data.tokenizer, "stream": {"seq_len": cfg.train.seq_len, "seed": cfg.train.seed},
        "schedule": schedule_fingerprint(cfg), "topology": topology_of(tr), "dtype": cfg.train.precision,
        "optimizer_step": optimizer_step, "portable_optimizer": portable,
        "resilience": tr.guard.state_dict() if getattr(tr, "guard", None) else None,
        "megatrain_version": megatrain.__version__,
    }


# --------------------------------------------------------------------------- save


def save(tr: "Trainer") -> Path:
    """Every rank calls this at the same step. Returns the final checkpoint directory."""
    root, step, rank = checkpoint_root(tr), tr.step, tr.st.rank
    tag = layout.tag_for_step(step)
    final, tmp = root / tag, root / f".tmp-{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    _crash_point("start", step)
    tr.engine.save_checkpoint(str(tmp / "ds"), tag="state", save_latest=False)
    _crash_point("ds", step)
    tensors = local_model_tensors(tr)
    if tr.st.dp_rank == 0:
        layout.write_model_shard(tmp, tr.st.tp_rank, tr.st.pp_rank, tensors, tr.st.tp_size, tr.st.pp_size)
    _crash_point("model", step)
    optimizer_step, portable = save_portable_optimizer(tr, tmp)
    _crash_point("optim", step)
    _write_rng(tmp / "rng" / f"rank{rank:05d}.pt", rng_state(tr))
    _crash_point("rng", step)
    _barrier()
    entries = _hash_distributed(tmp, rank, tr.st.world_size)
    _crash_point("hashed", step)
    if rank == 0:
        _finish(tr, root, tmp, final, entries, optimizer_step, portable)
    _barrier()
    return final


def _finish(tr: "Trainer", root: Path, tmp: Path, final: Path, entries: dict, optimizer_step: int,
            portable: bool) -> None:
    """Rank 0, once every rank's files are on disk: meta, manifest, COMPLETE, rename, latest, prune."""
    step = tr.step
    layout.write_meta(tmp, build_meta(tr, optimizer_step, portable))
    entries[layout.META] = _file_entry(tmp / layout.META)
    _crash_point("meta", step)
    layout.atomic_write_json(tmp / layout.MANIFEST, {"files": dict(sorted(entries.items()))})
    _crash_point("manifest", step)
    for d in sorted({p.parent for p in tmp.rglob("*")}, reverse=True):  # directory entries too, deepest first
        _fsync_dir(d)
    layout.mark_complete(tmp)
    _crash_point("complete", step)
    layout.replace_dir(tmp, final)
    _crash_point("renamed", step)
    layout.update_latest(root, final.name)
    _crash_point("latest", step)
    removed = prune(root, tr.cfg.checkpoint.keep_last, tr.cfg.checkpoint.keep_every)
    _crash_point("pruned", step)
    log.info("saved checkpoint %s (step %d%s)", final, step,
             f"; removed {', '.join(p.name for p in removed)}" if removed else "")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _remove_leftovers(root: Path) -> None:
    """Temporary directories of saves that were killed: never complete, never loaded, safe to delete."""
    for p in root.iterdir():
        if p.is_dir() and (p.name.startswith(".tmp-step_") or ".old-" in p.name or ".tmp-" in p.name):
            log.warning("removing %s, left by an interrupted save", p)
            shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the renames stay atomic
        pass
    finally:
        os.close(fd)


def _write_rng(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _file_entry(path: Path) -> dict:
    """Size and SHA-256 of one file; it is fsynced on the way (the rename that publishes it must not
    overtake its data on a crash)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def _hash_distributed(tmp: Path, rank: int, world: int) -> dict[str, dict]:
    """Manifest entries of every file under ``tmp``; rank r hashes every world-th file from the r-th, so a
    large checkpoint is read in parallel. Returns the merged table on rank 0 ({} elsewhere)."""
    rels = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    if world == 1:
        return {r: _file_entry(tmp / r) for r in rels}
    # Every rank's listing: on a network file system a rank's directory cache may not show another
    # node's files yet (opening them by name does), and each writer surely sees its own.
    listings: list = [None] * world
    dist.all_gather_object(listings, rels)
    rels = sorted(set().union(*listings))
    mine = {r: _file_entry(tmp / r) for r in rels[rank::world]}
    gathered: list = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return {k: v for part in gathered for k, v in part.items()} if rank == 0 else {}


def prune(root: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last`` (multiples of ``keep_every`` stay).
    Only rank 0 calls it. Incomplete ``step_*`` directories are left alone: they are never loaded, and
    deleting what someone may be writing is worse than keeping it."""
    if keep_last <= 0:
        return []
    done = layout.list_checkpoints(root)
    removed = []
    for p in done[:-keep_last]:
        if keep_every and layout.step_of_tag(p.name) % keep_every == 0:
            continue
        # Remove COMPLETE first: a crash halfway through leaves an incomplete directory, not a broken "complete" one.
        (p / layout.COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# --------------------------------------------------------------------------- portable optimizer state


def _lazy_state_linked(opt: Any) -> None:
    """ZeRO-1/2 and the bf16 optimizer link per-parameter views of the Adam state lazily; (re)link now."""
    o = opt
    while o is not None:
        if hasattr(o, "_lazy_init_hp_params_optimizer_state"):
            o._hp_optimizer_states_linked = False
            o._lazy_init_hp_params_optimizer_state()
        o = getattr(o, "optimizer", None)


def _base_optimizer(opt: Any) -> Any:
    while hasattr(opt, "optimizer") and opt.optimizer is not opt:
        opt = opt.optimizer
    return opt


def optimizer_step_count(opt: Any) -> int:
    """AdamW's step count (updates applied), 0 before the first update."""
    for st in _base_optimizer(opt).state.values():
        if "step" in st:
            s = st["step"]
            return int(s.item() if torch.is_tensor(s) else s)
    return 0


def _full_state(p: torch.nn.Parameter, base: Any, key: Optional[str]) -> torch.Tensor:
    """This TP/PP shard's full (all DP ranks) fp32 master (key None) or Adam state; collective over DP
    under ZeRO."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        t = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    else:  # ZeRO-0 in fp32: the torch optimizer holds the parameters themselves
        t = p.detach() if key is None else base.state[p][key]
    return t.detach().float().cpu().clone()


def save_portable_optimizer(tr: "Trainer", tmp: Path) -> tuple[int, bool]:
    """Write ``optim/tpXX_ppYY.safetensors`` (DP rank 0): AdamW moments (and fp32 masters unless the run is
    fp32) under canonical names. Returns (AdamW step count, whether the files were written)."""
    from megatrain.model.names import canonical_named_parameters

    opt = tr.engine.optimizer
    step = optimizer_step_count(opt)
    if not tr.cfg.checkpoint.portable_optimizer or step == 0:
        return step, tr.cfg.checkpoint.portable_optimizer
    _lazy_state_linked(opt)
    base = _base_optimizer(opt)
    keys = list(_ADAM_KEYS) + ([None] if tr.cfg.train.precision != "fp32" else [])
    out = {}
    for name, p in canonical_named_parameters(tr.engine.module, tr.cfg.model).items():
        for key in keys:  # same order on every DP rank: the gathers are collective
            out[f"{name}/{key or 'fp32'}"] = _full_state(p, base, key)
    if tr.st.dp_rank == 0:
        path = tmp / OPTIM_DIR / f"tp{tr.st.tp_rank:02d}_pp{tr.st.pp_rank:02d}.safetensors"
        _write_safetensors(path, out, {"step": str(step), "tp": str(tr.st.tp_size), "pp": str(tr.st.pp_size)})
    return step, True


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    from megatrain.file_modes import save_safetensors

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_safetensors({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def read_portable_optimizer(path: Path, meta: dict, names: list[str], tp_rank: int, tp: int,
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
        for key in list(_ADAM_KEYS) + (["fp32"] if with_fp32 else []):
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


def _materialize_adam_state(opt: Any, step: int) -> None:
    """Create AdamW state (zeros, ``step``) for every tensor the optimizer updates, as its first step would."""
    base = _base_optimizer(opt)
    flats = None
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        if getattr(opt, attr, None) is not None:
            flats = list(getattr(opt, attr))
            break
    targets = flats if flats is not None else [p for g in base.param_groups for p in g["params"]]
    torch_adam = isinstance(base, (torch.optim.Adam, torch.optim.AdamW))
    for t in targets:
        base.state[t] = {"step": torch.tensor(float(step)) if torch_adam else step,
                         "exp_avg": torch.zeros_like(t, memory_format=torch.preserve_format),
                         "exp_avg_sq": torch.zeros_like(t, memory_format=torch.preserve_format)}
    for g in base.param_groups:
        if "step" in g:  # DeepSpeed's fused Adam counts steps per group
            g["step"] = step


def _set_full_state(p: torch.nn.Parameter, opt: Any, key: Optional[str], value: torch.Tensor) -> None:
    if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition of the flat fp32 buffer (last one may be padded)
        z3 = p._z3_optimizer
        part, _ = z3._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
        flat = value.flatten().to(part.device, part.dtype)
        start = part.numel() * z3._get_param_partition_rank(p)
        n = max(0, min(part.numel(), flat.numel() - start))
        part.data[:n].copy_(flat[start:start + n])
    elif hasattr(p, "_hp_mapping"):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        v = value.to(p.device, torch.float32)
        safe_set_full_fp32_param(p, v) if key is None else safe_set_full_optimizer_state(p, v, key)
    elif key is None:
        with torch.no_grad():
            p.copy_(value.to(p.device, p.dtype))
    else:
        _base_optimizer(opt).state[p][key].copy_(value.to(p.device))


# --------------------------------------------------------------------------- choosing a checkpoint


def verify_checkpoint(path: Path, level: str) -> dict:
    """Everything that is checked before any file of ``path`` is unpickled; returns its meta.

    Raises CheckpointError naming the file: no COMPLETE, unreadable meta, manifest mismatch (sizes, or
    SHA-256 with ``full``), a file the manifest does not list, pickled code in DeepSpeed's files."""
    if not layout.is_complete(path):
        raise CheckpointError(f"{path}: partial checkpoint (no {layout.COMPLETE} marker: the save was interrupted); "
                              f"use another one")
    meta = layout.read_meta(path)
    if level != "off":
        layout.verify_manifest(path, level)
        listed = set(json.loads((path / layout.MANIFEST).read_text())["files"])
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = f.relative_to(path).as_posix()
            if rel not in listed and rel not in (layout.MANIFEST, layout.COMPLETE):
                raise CheckpointError(f"{f}: not listed in {layout.MANIFEST} (added after the save?); remove it or "
                                      f"use another checkpoint")
    scan_pickles(path)
    return meta


def _deepspeed_safe_globals() -> list:
    """The classes DeepSpeed pickles into its checkpoints: plain data holders, safe to rebuild."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def scan_pickles(path: Path) -> None:
    """Refuse a checkpoint whose torch files reference any code beyond torch's and DeepSpeed's data classes
    (a static scan of the pickle opcodes: nothing is executed)."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        for f in sorted(path.rglob("*.pt")):
            try:
                bad = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
            except Exception as e:  # noqa: BLE001 - not a zip torch file: weights_only loading refuses it anyway
                raise CheckpointError(f"{f}: not a readable torch checkpoint file ({e}); use another "
                                      f"checkpoint") from None
            if bad:
                raise CheckpointError(f"{f}: refers to {', '.join(bad[:3])}, which is code, not data; this file was "
                                      f"not written by megatrain/DeepSpeed and is not loaded (checkpoints must come "
                                      f"from a trusted place)")


@contextlib.contextmanager
def weights_only_unpickling() -> Iterator[None]:
    """Within the block every ``torch.load`` (DeepSpeed's included) runs with ``weights_only=True`` and
    DeepSpeed's data classes allowed."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ[keys[0]] = "1"
    os.environ.pop(keys[1], None)
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _candidates(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, in the order auto-resume tries them (newest first), saying why
    when ``latest`` disagrees."""
    done = list(reversed(layout.list_checkpoints(root)))
    latest_file = root / layout.LATEST
    named = latest_file.read_text(errors="replace").strip() if latest_file.is_file() else None
    if not done:
        if named or layout.list_checkpoints(root, complete_only=False):
            log.warning("%s: no complete checkpoint (every step_* directory lacks %s: interrupted saves)", root,
                        layout.COMPLETE)
        return []
    if named is None:
        log.warning("%s is missing; using the newest complete checkpoint %s", latest_file, done[0].name)
    elif named != done[0].name:
        state = "complete but older" if layout.is_complete(root / named) else "missing or incomplete"
        log.warning("%s names %s, which is %s; using the newest complete checkpoint %s", latest_file, named, state,
                    done[0].name)
    return done


def select_checkpoint(mode: str, root: Path, verify: str) -> Optional[Path]:
    """The checkpoint ``train.resume=mode`` means (verified), None to start fresh; CheckpointError otherwise.

    auto: the newest complete checkpoint under ``root`` that verifies (a damaged one is reported and the next
    older one tried); none at all: start fresh; some but all damaged: error. PATH: a step directory (must
    verify), or a checkpoints / run directory (as auto, but an error when nothing is there)."""
    if mode == "never":
        return None
    if mode != "auto":
        path = Path(mode)
        if not path.exists():
            raise CheckpointError(f"train.resume={mode}: no such file or directory")
        if layout.step_of_tag(path.name) is not None or (path / layout.META).is_file():
            verify_checkpoint(path, verify)
            return path
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    tried = []
    for cand in _candidates(root):
        try:
            verify_checkpoint(cand, verify)
            return cand
        except CheckpointError as e:
            log.warning("checkpoint %s is unusable: %s; trying the previous one", cand.name, e)
            tried.append(str(e))
    if tried:
        raise CheckpointError(f"train.resume={mode}: no usable checkpoint under {root}; every complete one is "
                              f"damaged (newest: {tried[0]}). Restore one, or start over deliberately with "
                              f"train.resume=never")
    if mode != "auto":
        raise CheckpointError(f"train.resume={mode}: holds no complete checkpoint")
    log.info("train.resume=auto: no checkpoint under %s; starting from scratch", root)
    return None


def _select_on_rank0(tr: "Trainer") -> Optional[Path]:
    """Rank 0 chooses and verifies; every rank gets the same answer (or the same error)."""
    result: list = [None]
    if tr.st.rank == 0:
        try:
            found = select_checkpoint(tr.cfg.train.resume, checkpoint_root(tr), tr.cfg.checkpoint.verify)
            result = [("ok", str(found) if found else None)]
        except (CheckpointError, ConfigError, OSError, ValueError) as e:  # the other ranks must hear of it too
            result = [("error", str(e) if isinstance(e, (CheckpointError, ConfigError)) else
                       f"train.resume={tr.cfg.train.resume}: {type(e).__name__}: {e}")]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(result, src=0)
    status, value = result[0]
    if status == "error":
        raise CheckpointError(value)
    return Path(value) if value else None


# --------------------------------------------------------------------------- compatibility


def _differences(old: dict, new: dict, prefix: str) -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {a!r} -> {b!r}")
    return out


def _model_fields(model: dict) -> dict:
    return {k: v for k, v in model.items() if k not in ("preset", "dropout", "init_std")}  # not the shapes


def _changes(tr: "Trainer", meta: dict) -> list[tuple[str, str, list[str]]]:
    """(resume_allow_changes item, what, differences) for everything that differs from the checkpoint."""
    cfg, out = tr.cfg, []
    if meta.get("model_hash") and meta["model_hash"] != cfg.model_hash():
        diffs = _differences(_model_fields(meta["config"].get("model") or {}), _model_fields(cfg.to_dict()["model"]),
                             "model.")
        out.append(("model", "model shape", diffs or ["model hash"]))
    old, new = meta.get("tokenizer_sha256"), tr.fingerprints.get("tokenizer")
    if old and new and old != new:
        out.append(("tokenizer", "tokenizer", [f"sha256 {old[:12]}... -> {new[:12]}..."]))
    diffs = []
    old, new = meta.get("data_fingerprint"), tr.fingerprints.get("data")
    if old and new and old != new:
        diffs.append(f"data fingerprint {old} -> {new} (other files, blend weights or split)")
    stream = meta.get("stream") or {}
    diffs += [f"train.{k} {stream[k]!r} -> {v!r}" for k, v in (("seq_len", cfg.train.seq_len),
                                                                  ("seed", cfg.train.seed))
              if k in stream and stream[k] != v]
    if diffs:
        out.append(("data", "dataset / sample stream", diffs))
    if meta.get("schedule"):
        diffs = _differences(meta["schedule"], schedule_fingerprint(cfg), "")
        if diffs:
            out.append(("schedule", "optimizer / learning-rate schedule", diffs))
    return out


def _shape_changes(tr: "Trainer", meta: dict, path: Path) -> list[str]:
    """Weights whose shape differs between the checkpoint's model and this run's (none can be loaded)."""
    if not meta.get("model_hash") or meta["model_hash"] == tr.cfg.model_hash():
        return []
    old, new = layout.model_layout(layout.model_config_of(meta, path)), layout.model_layout(tr.cfg.model)
    out = [f"{n} {tuple(old[n][0])} -> {tuple(new[n][0])}" for n in sorted(set(old) & set(new))
           if tuple(old[n][0]) != tuple(new[n][0])]
    out += [f"{n} only in the checkpoint" for n in sorted(set(old) - set(new))]
    return out + [f"{n} only in this run" for n in sorted(set(new) - set(old))]


def check_compatible(tr: "Trainer", meta: dict, path: Path) -> None:
    """Refuse to continue from a checkpoint of another model, tokenizer, dataset or schedule, unless allowed."""
    allow = set(tr.cfg.train.resume_allow_changes)
    shapes = _shape_changes(tr, meta, path) if "model" in allow else []
    if shapes:
        more = f" and {len(shapes) - 3} more" if len(shapes) > 3 else ""
        raise ConfigError(f"checkpoint {path}: its weights have other shapes than this run's model "
                          f"({'; '.join(shapes[:3])}{more}); train.resume_allow_changes=[model] covers only model "
                          f"fields that keep every shape (rope_theta, max_seq_len, norm_eps, ...). Resume with the "
                          f"checkpoint's model.* values, or start a new run")
    for key, what, diffs in _changes(tr, meta):
        if key not in allow:
            raise ConfigError(f"checkpoint {path}: the {what} differs from this run's ({'; '.join(diffs)}); resume "
                              f"with the original settings, or allow it deliberately with "
                              f"train.resume_allow_changes=[{key}]")
        log.warning("checkpoint %s: the %s changed (%s); allowed by train.resume_allow_changes", path, what,
                    "; ".join(diffs))


def same_topology(tr: "Trainer", meta: dict) -> bool:
    """Can DeepSpeed load its own files as they are? (Same grid, ZeRO stage, precision, offload, stages.)"""
    old, new = meta.get("topology") or {}, topology_of(tr)
    keys = ("tp", "pp", "dp", "zero_stage")
    if any(old.get(k) != new[k] for k in keys):
        return False
    extra = ("precision", "offload", "pipeline_partition")
    return all(old.get(k, new[k]) == new[k] for k in extra) and meta.get("dtype", new["precision"]) == new["precision"]


# --------------------------------------------------------------------------- resume


def resume(tr: "Trainer") -> tuple[int, int]:
    """Load the checkpoint that ``train.resume`` names into the engine; returns (step, consumed samples)."""
    path = _select_on_rank0(tr)
    if path is None:
        return 0, 0
    meta = layout.read_meta(path)
    check_compatible(tr, meta, path)
    step = int(meta["step"])
    if meta.get("weights_only"):
        load_weights_only(tr, path, meta)
        how = "weights only (optimizer state starts fresh)"
    elif same_topology(tr, meta):
        _load_native(tr, path)
        how = "DeepSpeed state, same topology"
    elif meta.get("portable_optimizer") and (meta.get("optimizer_step", 0) == 0 or (path / OPTIM_DIR).is_dir()):
        load_portable(tr, path, meta)
        how = f"resharded from {_describe(meta['topology'])} to {_describe(topology_of(tr))}"
    else:
        if "topology" not in tr.cfg.train.resume_allow_changes:
            raise ConfigError(f"checkpoint {path} was saved at {_describe(meta['topology'])} without portable "
                              f"optimizer state (checkpoint.portable_optimizer was off); this run is "
                              f"{_describe(topology_of(tr))}. Resume at the original topology, or accept a fresh "
                              f"optimizer with train.resume_allow_changes=[topology]")
        load_weights_only(tr, path, meta)
        how = "weights only (topology changed, no portable optimizer state)"
    if getattr(tr, "guard", None) is not None:
        tr.guard.load_state_dict(meta.get("resilience"))
    if "schedule" in tr.cfg.train.resume_allow_changes:
        apply_schedule(tr, step)
    log.info("resumed from %s: step %d, %d samples consumed (%s)", path, step, meta["consumed_samples"], how)
    return step, int(meta["consumed_samples"])


def _describe(topo: dict) -> str:
    return (f"TP={topo.get('tp')} PP={topo.get('pp')} DP={topo.get('dp')} ZeRO-{topo.get('zero_stage')}"
            f"{' ' + topo['precision'] if topo.get('precision') else ''}")


def _load_native(tr: "Trainer", path: Path) -> None:
    with weights_only_unpickling():
        tr.engine.load_checkpoint(str(path / "ds"), tag="state", load_module_strict=True,
                                  load_optimizer_states=True, load_lr_scheduler_states=True)
    rng_file = path / "rng" / f"rank{tr.st.rank:05d}.pt"
    if not rng_file.is_file():
        raise CheckpointError(f"{rng_file}: missing; the checkpoint is incomplete, use another one")
    restore_rng(tr, _load_rng(rng_file))


def _load_rng(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError and friends: the file is not plain data
        raise CheckpointError(f"{path}: not a plain-data RNG state ({str(e).splitlines()[0]}); refusing to load "
                              f"it, use another checkpoint") from None


def _read_weights(tr: "Trainer", path: Path, params: dict) -> dict[str, torch.Tensor]:
    """This rank's canonical weights, re-cut for its TP rank (one full tensor in memory at a time)."""
    _, weights = layout.load_weights_for_rank(path, tr.st.tp_rank, tr.st.tp_size, names=list(params), verify="off")
    return weights


def load_portable(tr: "Trainer", path: Path, meta: dict) -> None:
    """Weights and AdamW state from the canonical files, cut for this run's TP/PP/DP and ZeRO stage."""
    from megatrain.model.names import canonical_named_parameters

    params = canonical_named_parameters(tr.engine.module, tr.cfg.model)
    weights = _read_weights(tr, path, params)
    opt, step = tr.engine.optimizer, int(meta.get("optimizer_step", 0))
    saved_masters = meta.get("dtype", "fp32") != "fp32"
    state = read_portable_optimizer(path, meta, list(params), tr.st.tp_rank, tr.st.tp_size, saved_masters) \
        if step else {}
    if step:
        _materialize_adam_state(opt, step)
        _lazy_state_linked(opt)
    for name, p in params.items():
        master = state.get(f"{name}/fp32", weights[name]).float()  # the fp32 master when it was saved
        _assign(tr, p, master)
        _set_full_state(p, opt, None, master)
        for key in _ADAM_KEYS if step else ():
            _set_full_state(p, opt, key, state[f"{name}/{key}"])
    _set_progress(tr, int(meta["step"]), int(meta["consumed_samples"]), meta)
    topo = meta.get("topology") or {}
    rng_file = path / "rng" / f"rank{tr.st.rank:05d}.pt"
    if (topo.get("tp"), topo.get("pp"), topo.get("dp")) == (tr.st.tp_size, tr.st.pp_size, tr.st.dp_size) \
            and rng_file.is_file():
        restore_rng(tr, _load_rng(rng_file))
    else:
        reseed_rng(tr, int(meta["step"]))


def _set_progress(tr: "Trainer", step: int, consumed: int, meta: dict) -> None:
    """The engine's counters and the learning rate, as after ``step`` steps."""
    eng = tr.engine
    eng.global_steps, eng.global_samples = step, consumed
    eng.skipped_steps = int((meta.get("resilience") or {}).get("skipped", 0))
    sched = eng.lr_scheduler
    if sched is not None:
        sched.last_epoch = step - 1
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore")
            sched.step()


def apply_schedule(tr: "Trainer", step: int) -> None:
    """``resume_allow_changes=[schedule]``: this run's optimizer and schedule settings replace the saved ones."""
    o = tr.cfg.optimizer
    sched = tr.engine.lr_scheduler
    for g in _base_optimizer(tr.engine.optimizer).param_groups:
        g.update({"initial_lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps})
        if g.get("weight_decay", 0.0):
            g["weight_decay"] = o.weight_decay
    if sched is not None:
        sched.base_lrs = [o.lr] * len(sched.base_lrs)
    _set_progress(tr, step, tr.engine.global_samples, {"resilience": {"skipped": tr.engine.skipped_steps}})


def load_weights_only(tr: "Trainer", path: Path, meta: dict) -> None:
    """Model weights from the canonical shards (any TP/PP); the optimizer state starts fresh, the schedule and
    counters continue at the checkpoint's step."""
    from megatrain.model.names import canonical_named_parameters

    if not meta.get("weights_only"):
        log.warning("checkpoint %s: loading its weights only; the optimizer state restarts", path)
    params = canonical_named_parameters(tr.engine.module, tr.cfg.model)
    weights = _read_weights(tr, path, params)
    for name, p in params.items():  # DeepSpeed keeps its own fp32 masters: refresh them from the weights
        _assign(tr, p, weights[name])
        _set_full_state(p, tr.engine.optimizer, None, weights[name].float())
    _set_progress(tr, int(meta["step"]), int(meta["consumed_samples"]), meta)
    reseed_rng(tr, int(meta["step"]))


def _assign(tr: "Trainer", p: torch.nn.Parameter, src: torch.Tensor) -> None:
    if tuple(src.shape) != tuple(getattr(p, "ds_shape", p.shape)):
        raise CheckpointError(f"checkpoint tensor shape {tuple(src.shape)} does not fit parameter of shape "
                              f"{tuple(getattr(p, 'ds_shape', p.shape))}")
    if tr.cfg.deepspeed.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():  # rank 0 of the DP group
            p.data.copy_(src.to(p.device, p.dtype))
        return
    with torch.no_grad():
        p.copy_(src.to(p.device, p.dtype))
