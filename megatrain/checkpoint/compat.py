"""Can this run continue from that checkpoint? Fingerprints recorded at save, compared at resume."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from megatrain.checkpoint import layout
from megatrain.config import Config, ConfigError

log = logging.getLogger(__name__)

# The arguments of the megatrain-train command this process runs (set by its main()), for hints that
# give the exact command to run next; None: sys.argv.
COMMAND_ARGS: Optional[list] = None


def schedule_fingerprint(cfg: Config) -> dict:
    """What decides the learning rate and the AdamW update at every step."""
    o, s = cfg.optimizer, cfg.schedule
    return {"optimizer": {k: getattr(o, k) for k in ("lr", "min_lr", "beta1", "beta2", "eps", "weight_decay",
                                                     "grad_clip")},
            "schedule": {"warmup_steps": s.warmup_steps, "decay": s.decay,
                         "decay_steps": s.decay_steps or cfg.train.max_steps,
                         "wsd_decay_fraction": s.wsd_decay_fraction,
                         **({"extend": {"step": s.extend_step, "lr": s.extend_lr, "mode": s.extend_mode}}
                            if s.extend_step is not None else {})}}


def topology_of(cfg: Config, st: Any) -> dict:
    """The layout a checkpoint was saved at (``st`` is the run's ParallelState)."""
    return {"tp": st.tp_size, "pp": st.pp_size, "dp": st.dp_size, "cp": st.cp_size, "zero_stage": cfg.deepspeed.zero_stage,
            "world_size": st.world_size, "precision": cfg.train.precision, "offload": cfg.deepspeed.offload,
            "pipeline_partition": cfg.parallel.pipeline_partition if st.pp_size > 1 else None}


def describe(topo: dict) -> str:
    cp = f" CP={topo['cp']}" if topo.get("cp", 1) != 1 else ""
    return (f"TP={topo.get('tp')}{cp} PP={topo.get('pp')} DP={topo.get('dp')} ZeRO-{topo.get('zero_stage')}"
            f"{' ' + topo['precision'] if topo.get('precision') else ''}")


def same_topology(old: dict, new: dict, meta: dict) -> bool:
    """Can DeepSpeed load its own files as they are? (Same grid, ZeRO stage, precision, offload, stages.)"""
    if any(old.get(k) != new[k] for k in ("tp", "pp", "dp", "zero_stage")) or old.get("cp", 1) != new.get("cp", 1):
        return False  # (checkpoints from before context parallelism have no "cp": they are CP=1)
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


def _schedule_of(fp: dict, cfg: Config) -> tuple[Any, Any]:
    """(OptimizerConfig, ScheduleConfig) that a schedule fingerprint describes (this run's otherwise)."""
    import dataclasses

    o = dataclasses.replace(cfg.optimizer, **fp["optimizer"])
    s, ext = dict(fp["schedule"]), fp["schedule"].get("extend") or {}
    s.pop("extend", None)
    s.update(extend_step=ext.get("step"), extend_lr=ext.get("lr"), extend_mode=ext.get("mode"))
    return o, dataclasses.replace(cfg.schedule, **s)


def lr_after(fp: dict, cfg: Config, step: int) -> float:
    """The LR of the last step taken before ``step`` under the schedule ``fp`` describes."""
    from megatrain.optim import lr_at

    o, s = _schedule_of(fp, cfg)
    return lr_at(max(0, step - 1), o, s, s.decay_steps)


def _without(fp: dict, *keys: str) -> dict:
    return {**fp, "schedule": {k: v for k, v in fp["schedule"].items() if k not in keys}}


def extend_command(step: int, new_end: int) -> str:
    """The command that continues this run to ``new_end``: the one that was run, with the new horizon."""
    import shlex
    import sys

    given = COMMAND_ARGS if COMMAND_ARGS is not None else sys.argv[1:]
    args = [a for a in given if not a.startswith(("train.max_steps=", "schedule.on_extend=", "--local_rank",
                                                  "--eval-only", "eval.only="))]
    return " ".join(["megatrain-train", *map(shlex.quote, args), f"train.max_steps={new_end}"])


def plan_extension(cfg: Config, meta: dict, step: int) -> bool:
    """A resume whose only schedule change is a later horizon: apply ``schedule.on_extend`` (recording the
    extension in ``cfg.schedule``, so that it is saved and resumed with the run) or refuse with the exact
    command. Returns True when the schedule difference is settled here."""
    old, new = meta.get("schedule"), schedule_fingerprint(cfg)
    if not old or old == new:
        return False
    if old["schedule"].get("extend") and cfg.schedule.extend_step is None and _without(old, "extend") == \
            _without(new, "extend"):  # the extended run itself, resumed (a preemption, a requeue)
        ext = old["schedule"]["extend"]
        cfg.schedule.extend_step, cfg.schedule.extend_lr, cfg.schedule.extend_mode = ext["step"], ext["lr"], ext["mode"]
        return True
    if cfg.eval.only:  # nothing is trained: the schedule does not matter
        return True
    end, old_end = new["schedule"]["decay_steps"], old["schedule"]["decay_steps"]
    if _without(old, "decay_steps", "extend") != _without(new, "decay_steps", "extend") or end <= max(step, old_end):
        return False
    mode, lr = cfg.schedule.on_extend, lr_after(old, cfg, step)
    if mode == "refuse":
        raise ConfigError(f"the run is at step {step}; its learning-rate schedule ends at step {old_end}, this start's "
                          f"at {end}. Say how the LR goes on from {lr:.3g}: {extend_command(step, end)} "
                          f"schedule.on_extend=continue (down from {lr:.3g} to optimizer.min_lr at step {end}, no "
                          f"jump), or schedule.on_extend=rewarm (back up to the peak over schedule.warmup_steps, "
                          f"then the decay)")
    cfg.schedule.extend_step, cfg.schedule.extend_lr, cfg.schedule.extend_mode = step - 1, lr, mode
    return True


def _shape_changes(cfg: Config, meta: dict, path: Path) -> list[str]:
    """Weights whose shape differs between the checkpoint's model and this run's (none can be loaded)."""
    if not meta.get("model_hash") or meta["model_hash"] == cfg.model_hash():
        return []
    old, new = layout.model_layout(layout.model_config_of(meta, path)), layout.model_layout(cfg.model)
    out = [f"{n} {tuple(old[n][0])} -> {tuple(new[n][0])}" for n in sorted(set(old) & set(new))
           if tuple(old[n][0]) != tuple(new[n][0])]
    out += [f"{n} only in the checkpoint" for n in sorted(set(old) - set(new))]
    return out + [f"{n} only in this run" for n in sorted(set(new) - set(old))]


def check_compatible(cfg: Config, fingerprints: Optional[dict], meta: dict, path: Path,
                     schedule_settled: bool = False) -> None:
    """Refuse to continue from a checkpoint of another model, tokenizer, dataset or schedule, unless allowed.
    ``schedule_settled``: the schedule difference is an extension :func:`plan_extension` applied."""
    allow = set(cfg.train.resume_allow_changes) | ({"schedule"} if schedule_settled else set())
    shapes = _shape_changes(cfg, meta, path) if "model" in allow else []
    if shapes:
        more = f" and {len(shapes) - 3} more" if len(shapes) > 3 else ""
        raise ConfigError(f"checkpoint {path}: its weights have other shapes than this run's model "
                          f"({'; '.join(shapes[:3])}{more}); train.resume_allow_changes=[model] covers only model "
                          f"fields that keep every shape (rope_theta, max_seq_len, norm_eps, ...). Resume with the "
                          f"checkpoint's model.* values, or start a new run")
    for key, what, diffs in _changes(cfg, fingerprints or {}, meta):
        if key in ("model", "tokenizer", "data") and key not in allow:
            run_dir = path.parent.parent
            raise ConfigError(f"checkpoint {path}: the {what} differs from this run's ({'; '.join(diffs)}), so this "
                              f"is another run: give it its own directory (run.dir={run_dir.parent}/NEW_NAME), or "
                              f"start over in {run_dir} with train.resume=never (its checkpoints are then replaced). "
                              f"To go on with these weights on purpose: train.resume_allow_changes=[{key}]")
        if key not in allow:
            raise ConfigError(f"checkpoint {path}: the {what} differs from this run's ({'; '.join(diffs)}); resume "
                              f"with the original settings, or allow it deliberately with "
                              f"train.resume_allow_changes=[{key}]")
        if key == "schedule" and schedule_settled:
            continue
        log.warning("checkpoint %s: the %s changed (%s); allowed by train.resume_allow_changes", path, what,
                    "; ".join(diffs))
