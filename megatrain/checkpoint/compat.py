"""Can this run continue from that checkpoint? Fingerprints recorded at save, compared at resume."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from megatrain.checkpoint import layout
from megatrain.config import Config, ConfigError

log = logging.getLogger(__name__)


def schedule_fingerprint(cfg: Config) -> dict:
    """What decides the learning rate and the AdamW update at every step."""
    o, s = cfg.optimizer, cfg.schedule
    return {"optimizer": {k: getattr(o, k) for k in ("lr", "min_lr", "beta1", "beta2", "eps", "weight_decay",
                                                     "grad_clip")},
            "schedule": {"warmup_steps": s.warmup_steps, "decay": s.decay,
                         "decay_steps": s.decay_steps or cfg.train.max_steps,
                         "wsd_decay_fraction": s.wsd_decay_fraction}}


def topology_of(cfg: Config, st: Any) -> dict:
    """The layout a checkpoint was saved at (``st`` is the run's ParallelState)."""
    return {"tp": st.tp_size, "pp": st.pp_size, "dp": st.dp_size, "zero_stage": cfg.deepspeed.zero_stage,
            "world_size": st.world_size, "precision": cfg.train.precision, "offload": cfg.deepspeed.offload,
            "pipeline_partition": cfg.parallel.pipeline_partition if st.pp_size > 1 else None}


def describe(topo: dict) -> str:
    return (f"TP={topo.get('tp')} PP={topo.get('pp')} DP={topo.get('dp')} ZeRO-{topo.get('zero_stage')}"
            f"{' ' + topo['precision'] if topo.get('precision') else ''}")


def same_topology(old: dict, new: dict, meta: dict) -> bool:
    """Can DeepSpeed load its own files as they are? (Same grid, ZeRO stage, precision, offload, stages.)"""
    if any(old.get(k) != new[k] for k in ("tp", "pp", "dp", "zero_stage")):
        return False
    extra = ("precision", "offload", "pipeline_partition")
    return all(old.get(k, new[k]) == new[k] for k in extra) and meta.get("dtype", new["precision"]) == new["precision"]


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


def _changes(cfg: Config, fingerprints: dict, meta: dict) -> list[tuple[str, str, list[str]]]:
    """(resume_allow_changes item, what, differences) for everything that differs from the checkpoint."""
    out = []
    if meta.get("model_hash") and meta["model_hash"] != cfg.model_hash():
        diffs = _differences(_model_fields(meta["config"].get("model") or {}), _model_fields(cfg.to_dict()["model"]),
                             "model.")
        out.append(("model", "model shape", diffs or ["model hash"]))
    old, new = meta.get("tokenizer_sha256"), fingerprints.get("tokenizer")
    if old and new and old != new:
        out.append(("tokenizer", "tokenizer", [f"sha256 {old[:12]}... -> {new[:12]}..."]))
    diffs = []
    old, new = meta.get("data_fingerprint"), fingerprints.get("data")
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


def _shape_changes(cfg: Config, meta: dict, path: Path) -> list[str]:
    """Weights whose shape differs between the checkpoint's model and this run's (none can be loaded)."""
    if not meta.get("model_hash") or meta["model_hash"] == cfg.model_hash():
        return []
    old, new = layout.model_layout(layout.model_config_of(meta, path)), layout.model_layout(cfg.model)
    out = [f"{n} {tuple(old[n][0])} -> {tuple(new[n][0])}" for n in sorted(set(old) & set(new))
           if tuple(old[n][0]) != tuple(new[n][0])]
    out += [f"{n} only in the checkpoint" for n in sorted(set(old) - set(new))]
    return out + [f"{n} only in this run" for n in sorted(set(new) - set(old))]


def check_compatible(cfg: Config, fingerprints: Optional[dict], meta: dict, path: Path) -> None:
    """Refuse to continue from a checkpoint of another model, tokenizer, dataset or schedule, unless allowed."""
    allow = set(cfg.train.resume_allow_changes)
    shapes = _shape_changes(cfg, meta, path) if "model" in allow else []
    if shapes:
        more = f" and {len(shapes) - 3} more" if len(shapes) > 3 else ""
        raise ConfigError(f"checkpoint {path}: its weights have other shapes than this run's model "
                          f"({'; '.join(shapes[:3])}{more}); train.resume_allow_changes=[model] covers only model "
                          f"fields that keep every shape (rope_theta, max_seq_len, norm_eps, ...). Resume with the "
                          f"checkpoint's model.* values, or start a new run")
    for key, what, diffs in _changes(cfg, fingerprints or {}, meta):
        if key not in allow:
            raise ConfigError(f"checkpoint {path}: the {what} differs from this run's ({'; '.join(diffs)}); resume "
                              f"with the original settings, or allow it deliberately with "
                              f"train.resume_allow_changes=[{key}]")
        log.warning("checkpoint %s: the %s changed (%s); allowed by train.resume_allow_changes", path, what,
                    "; ".join(diffs))
