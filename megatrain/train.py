"""megatrain-train: parse, build, train.

    megatrain-train [--config FILE.yaml] [dotted.key=value ...] [--dry-run] [--help-config]

With no config and no ``data.path`` it runs the demo: the built-in corpus (made
on first use), the ``demo`` model, a few minutes on CPU, under ``runs/demo``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from megatrain.telemetry.console import pipe_safe

log = logging.getLogger("megatrain.train")

DEMO_DEFAULTS = [
    "model.preset=demo", "data.split=95,5,0", "train.seq_len=256", "train.micro_batch_size=8", "train.max_steps=200",
    "optimizer.lr=2e-3", "optimizer.min_lr=2e-4", "schedule.warmup_steps=30", "eval.interval=50",
    "eval.steps=4", 'eval.prompts=["def ", "The "]', "eval.sample_tokens=24", "eval.top_p=0.9",
    "eval.temperature=0.8", "logging.interval=10",
    "run.dir=runs/demo",
]


def _user_errors() -> tuple:
    """Exceptions that mean "the input is wrong": reported as one clear line, exit code 2."""
    from megatrain.checkpoint import CheckpointError
    from megatrain.config import ConfigError
    from megatrain.data.indexed import DataFormatError
    from megatrain.launch.discover import LaunchError
    from megatrain.launch.run_lock import RunDirBusy

    return (ConfigError, DataFormatError, CheckpointError, LaunchError, RunDirBusy, FileNotFoundError)


def _run_errors() -> tuple:
    """Failures of the job itself (a peer died, a collective timed out): one line naming the phase, exit 1."""
    from megatrain.checkpoint.save import SaveError
    from megatrain.resilience import DistributedError

    return (DistributedError, SaveError)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megatrain-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (sections as in megatrain/config/__init__.py)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, batch arithmetic, parameters, FLOPs and memory; touch nothing")
    p.add_argument("--world-size", type=int, default=None, help="dry run: assume this many processes")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the run's checkpoint on the valid and test splits and eval.datasets (loss, "
                        "perplexity, to metrics.jsonl), then exit: eval.only=true")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args, unknown = p.parse_known_args(argv)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    args.overrides += [u for u in unknown if not u.startswith("--local_rank")]
    if args.eval_only:
        args.overrides.append("eval.only=true")
    bad = [u for u in args.overrides if u.startswith("--")]
    if bad:
        p.error(f"unknown option(s) {bad}; config keys are written without dashes: key=value")
    return args


def resolve_config(args: argparse.Namespace):
    from megatrain.config import load_config

    demo = args.config is None and not any(o.startswith("data.path=") for o in args.overrides)
    return load_config(args.config, (DEMO_DEFAULTS if demo else []) + args.overrides)


@pipe_safe
def main(argv: Optional[list[str]] = None) -> int:
    from megatrain.launch.exit_status import record

    code = _main(argv)
    record(code)  # a launcher that replaces exit codes (torchrun) cannot hide 75 from its wrapper
    return code


def _main(argv: Optional[list[str]] = None) -> int:
    from megatrain.telemetry.logs import setup_logging

    args = parse_args(argv)
    from megatrain.checkpoint import compat

    compat.COMMAND_ARGS = list(sys.argv[1:] if argv is None else argv)  # for "run this next" hints
    setup_logging()
    if args.help_config:
        from megatrain.config import describe_fields

        for key, default, doc in describe_fields():
            sys.stdout.write(f"{key:42s} {default:>14s}  {doc}\n")
        return 0
    errors = _user_errors()
    try:
        cfg = resolve_config(args)
        setup_logging(cfg.logging.level, all_ranks=cfg.logging.all_ranks)
        if args.dry_run:
            from megatrain.config import ConfigError
            from megatrain.telemetry.report import dry_run_report

            world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
            if world < 1:
                raise ConfigError(f"--world-size {world}: must be >= 1")
            sys.stdout.write(dry_run_report(cfg, world) + "\n")
            return 0
        return run(cfg, user_config=args.config)
    except errors as e:
        log.error("error: %s", e)
        return 2
    except _run_errors() as e:
        log.error("job failed: %s", e)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the training loop handles it (start-up, data, engine)
        log.error("interrupted before training started; no checkpoint was written by this run")
        return 130


def run(cfg, user_config: Optional[str] = None) -> int:
    import torch
    import torch.distributed as dist

    from megatrain.config import ConfigError, validate_world
    from megatrain.launch.rendezvous import init_distributed
    from megatrain.checkpoint.select import check_fresh_start
    from megatrain.launch.run_lock import hold_run_dir
    from megatrain.parallel.state import ParallelState

    from megatrain.telemetry.ds_output import use_cpu_accelerator

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    use_cpu_accelerator(device_type)  # before deepspeed is first imported
    if cfg.train.precision == "auto":
        cfg.train.precision = "bf16" if device_type == "cuda" else "fp32"
    if cfg.train.precision == "fp16" and device_type == "cpu":
        raise ConfigError("train.precision=fp16 needs a GPU (DeepSpeed has no fp16 path on the CPU); "
                          "use fp32 or bf16 here")
    init_distributed(cfg.distributed, device_type)  # picks this rank's GPU from its local rank
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    lock = None
    try:
        validate_world(cfg, dist.get_world_size())
        st = ParallelState.build(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.context)
        _check_output_dirs(cfg)
        # One job per run directory, and no fresh start over step directories: both before anything is written.
        lock = hold_run_dir(Path(cfg.run.dir), st.rank, check=lambda: check_fresh_start(cfg))
        return train_with(cfg, st, device, user_config).exit_code
    finally:
        if lock is not None:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def train_with(cfg, st, device, user_config: Optional[str] = None):
    """Everything after the process group exists: data, engine, the loop. Returns the Trainer.
    ``user_config`` is the --config file, which the run never overwrites."""
    import torch.distributed as dist

    from megatrain.data.batch import plan_batch
    from megatrain.engine import build_ds_config, build_engine
    from megatrain.telemetry.report import start_report
    from megatrain.trainer import Trainer

    from megatrain.parallel.fp8 import check_fp8

    check_fp8(cfg.train, device)  # torchao, GPU capability and precision, before any data is touched
    plan = plan_batch(cfg.train, st.dp_size)  # batch and template errors before any data is touched
    ds_config = build_ds_config(cfg, plan)
    _check_output_dirs(cfg)
    tokenizer = _prepare_data(cfg, st)
    datasets, fingerprints = _build_datasets(cfg, st, plan, tokenizer)
    run_dir = Path(cfg.run.dir)
    if st.rank == 0:
        log.info(start_report(cfg, st.world_size, st.dp_size, plan))
    dist.barrier()
    torch_seed(cfg.train.seed)
    built = build_engine(cfg, st, device, plan, ds_config)
    trainer = Trainer(cfg, st, built, datasets, run_dir, device, tokenizer=tokenizer, fingerprints=fingerprints)
    if st.rank == 0 and not cfg.eval.only:  # after the resume checks: a refused start leaves config.yaml as it was
        trainer.on_resumed = lambda: _write_resolved_config(cfg, run_dir, user_config)
    trainer.exit_code = trainer.train()
    return trainer


def _check_output_dirs(cfg) -> None:
    """Directories the run writes must not be, or sit under, a regular file: refused now, not at the final save."""
    from megatrain.config import ConfigError
    from megatrain.files import file_in_the_way

    wanted = [("run.dir", Path(cfg.run.dir) / "checkpoints")]  # the walk up also covers run.dir itself
    if cfg.data.cache_dir:
        wanted.append(("data.cache_dir", Path(cfg.data.cache_dir)))
    for key, path in wanted:
        blocker = file_in_the_way(path)
        if blocker is not None:
            raise ConfigError(f"{key}: {blocker} is a file, but the run writes {path} as a directory; "
                              f"choose another {key} or move the file")


def torch_seed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare_data(cfg, st):
    """Demo corpus when no data.path (rank 0 builds it, the others wait), then the tokenizer."""
    import torch.distributed as dist

    from megatrain.config import ConfigError

    if cfg.data.path is None:
        from megatrain.data.demo import prepare_demo
        from megatrain.data.loader import demo_cache_dir

        if st.rank == 0:
            prepare_demo(demo_cache_dir(cfg.data))
        dist.barrier()
        prefix, tok = prepare_demo(demo_cache_dir(cfg.data))
        cfg.data.path = prefix
        cfg.data.tokenizer = cfg.data.tokenizer or tok
    if cfg.data.tokenizer is None:
        return None
    from megatrain.data.tokenizer import Tokenizer

    if not Path(cfg.data.tokenizer).is_file():
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer}: no such file")
    tok = Tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"data.tokenizer {cfg.data.tokenizer} has {tok.vocab_size} tokens but model.vocab_size="
                          f"{cfg.model.vocab_size}; set model.vocab_size >= {tok.vocab_size}")
    return tok


def _build_datasets(cfg, st, plan, tokenizer):
    from megatrain.data.loader import build_datasets, data_fingerprint

    n_train, n_valid = plan.train_samples(cfg.train.max_steps), plan.eval_samples(cfg.eval.steps)
    wanted = {"train": n_train, "valid": n_valid, **({"test": n_valid} if cfg.eval.only else {})}
    datasets = build_datasets(cfg.data, seq_len=cfg.train.seq_len, num_samples=wanted,
                              seed=cfg.train.seed, vocab_size=cfg.model.vocab_size,
                              tokenizer_sha256=tokenizer.sha256 if tokenizer else None)
    if cfg.eval.only:
        datasets.update(_eval_datasets(cfg, n_valid, tokenizer))
    return datasets, {"data": data_fingerprint(cfg.data), "tokenizer": tokenizer.sha256 if tokenizer else None}


def _eval_datasets(cfg, n_samples: int, tokenizer) -> dict:
    """eval.datasets: each prefix whole (its own "test" split), under the key "eval:PREFIX"."""
    import dataclasses

    from megatrain.data.loader import build_datasets

    out = {}
    for prefix in cfg.eval.datasets:
        whole = dataclasses.replace(cfg.data, path=prefix, split="0,0,1")
        out[f"eval:{prefix}"] = build_datasets(whole, seq_len=cfg.train.seq_len, num_samples={"test": n_samples},
                                               seed=cfg.train.seed, vocab_size=cfg.model.vocab_size,
                                               tokenizer_sha256=tokenizer.sha256 if tokenizer else None)["test"]
    return out


def _write_resolved_config(cfg, run_dir: Path, user_config: Optional[str] = None) -> Path:
    """run.dir/config.yaml, unless that file is the user's --config (resuming with
    ``--config RUN/config.yaml``): a file the user gave is an input and is never replaced, so the
    resolved config then goes next to it, as config.resolved.yaml. Returns the path written."""
    from megatrain.config import config_to_yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    target, text = run_dir / "config.yaml", config_to_yaml(cfg)
    if user_config and target.exists() and os.path.samefile(user_config, target):
        if target.read_text(encoding="utf-8") == text:
            return target
        target = run_dir / "config.resolved.yaml"
        log.info("run.dir/config.yaml is the --config file: left as it is; this start's resolved config is in %s",
                 target)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, target)
    return target


if __name__ == "__main__":
    sys.exit(main())
