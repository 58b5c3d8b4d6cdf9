"""A user's first day (issue 17) and the training side of "an output is never an input" (issue 16):
run directories, the --config file, samples under pipeline parallelism, extending and evaluating."""

from __future__ import annotations

import os

import pytest

from megatrain.config import ConfigError, load_config
from megatrain.train import main
from tests.training.test_main import BASE, LAUNCH_VARS


def _main(args: list[str]) -> int:
    for k in LAUNCH_VARS:  # an earlier in-process main() exported them
        os.environ.pop(k, None)
    return main(args)


def test_empty_run_dir_is_refused_not_the_working_directory(capsys, tmp_path):
    assert _main(BASE + ["run.dir=", f"data.path={tmp_path}/nope"]) == 2
    out = capsys.readouterr().out
    assert "run.dir='': empty" in out and "run.dir=." in out
    with pytest.raises(ConfigError, match="run.dir"):
        load_config(None, ["run.dir=", "model.preset=debug"])
    assert load_config(None, ["run.dir=.", "model.preset=debug"]).run.dir == "."


def test_run_dir_defaults_to_the_config_files_name(tmp_path):
    f = tmp_path / "my-run.yaml"
    f.write_text("model:\n  preset: debug\n")
    assert load_config(f).run.dir == "runs/my-run"
    assert load_config(f, ["run.dir=elsewhere"]).run.dir == "elsewhere"
    f.write_text("model:\n  preset: debug\nrun:\n  name: x\n")
    assert load_config(f).run.dir == "runs/my-run" and load_config(f).run.name == "x"
    f.write_text("model:\n  preset: debug\nrun:\n  dir: mine\n")
    assert load_config(f).run.dir == "mine"
    assert load_config(None, ["model.preset=debug"]).run.dir == "runs/demo"


def test_the_users_config_file_in_run_dir_is_never_overwritten(capsys, tmp_path, pattern_dataset):
    run = tmp_path / "run"
    run.mkdir()
    mine = run / "config.yaml"
    text = f"# my notes\nmodel:\n  preset: debug\ndata:\n  path: {pattern_dataset}\nrun:\n  dir: {run}\n"
    mine.write_text(text)
    assert _main(["--config", str(mine)] + BASE + ["train.max_steps=1"]) == 0
    assert mine.read_text() == text  # the input is untouched
    resolved = load_config(run / "config.resolved.yaml")
    assert resolved.data.path == pattern_dataset and resolved.train.max_steps == 1
    out = capsys.readouterr().out
    assert "is the --config file: left as it is" in out
    # the launch line names the port the kernel chose, not "<free port>"
    import re

    assert "<free port>" not in out and re.search(r"master 127\.0\.0\.1:\d+, found by single", out), out[:500]


# --------------------------------------------------------------------------- text samples under PP


def _samples(data: str, run_dir: str, tokenizer: str, extra: list[str]) -> list[str]:
    import torch
    import torch.distributed as dist

    from megatrain.parallel.state import ParallelState
    from megatrain.train import train_with
    from tests.tiny import tiny_run

    cfg = load_config(None, tiny_run(data, run_dir, 2, "train.resume=never", "checkpoint.save_at_end=false",
                                     "model.init_std=0.1", f"data.tokenizer={tokenizer}", "eval.sample_tokens=10",
                                     'eval.prompts=["Kalo mi", "The"]', "eval.top_p=0", *extra))
    tr = train_with(cfg, ParallelState.build(cfg.parallel.tensor, cfg.parallel.pipeline), torch.device("cpu"))
    dist.barrier()
    return [r["samples"] for r in tr.history if "samples" in r]


def test_text_samples_under_pipeline_parallelism_match_the_plain_model(pattern_dataset, tmp_path):
    # They were skipped under PP ("text samples are skipped under pipeline parallelism"). The tokenizer has
    # 300 pieces and the model 512 rows: the padded ids must never be drawn either (SentencePiece would raise).
    from megatrain.launch.testing import run_distributed
    from tests.convert.conftest import train_tiny_tokenizer

    tok = str(train_tiny_tokenizer(tmp_path / "tok", 300))
    plain = run_distributed(_samples, 1, pattern_dataset, str(tmp_path / "pp1"), tok, ["train.micro_batch_size=2"])[0]
    piped = run_distributed(_samples, 2, pattern_dataset, str(tmp_path / "pp2"), tok,
                            ["train.micro_batch_size=2", "parallel.pipeline=2"])
    assert plain and len(plain[-1]) == 2 and plain[-1][0].startswith("Kalo mi")
    assert piped[0] == piped[1] == plain  # every stage holds the same text, the plain model's


# --------------------------------------------------------------------------- extend, re-run, evaluate only


def _records(run) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_extend_a_finished_run_rerun_it_and_evaluate_it(capsys, tmp_path, pattern_dataset):
    import math

    from megatrain.config import OptimizerConfig, ScheduleConfig
    from megatrain.optim import lr_at

    run = tmp_path / "run"
    args = ["model.preset=debug", f"data.path={pattern_dataset}", "data.split=90,5,5", f"run.dir={run}",
            "train.seq_len=32", "train.micro_batch_size=4", "train.precision=fp32", "logging.interval=1",
            "eval.steps=1", "eval.sample_tokens=0", "optimizer.lr=3e-3", "optimizer.min_lr=3e-4",
            "schedule.warmup_steps=2"]
    assert _main(args + ["train.max_steps=10"]) == 0
    lr10 = [r["lr"] for r in _records(run) if "lr" in r][-1]
    saved_config = (run / "config.yaml").read_text()

    # re-running a finished run: says so, gives the commands, exits 0 (no silent evaluation)
    capsys.readouterr()
    n = len(_records(run))
    assert _main(args + ["train.max_steps=10"]) == 0
    out = capsys.readouterr().out
    assert "already at step 10" in out and "megatrain-train model.preset=debug" in out
    assert "warmup_steps=2 train.max_steps=20 schedule.on_extend=continue" in out
    assert "train.max_steps=10 --eval-only" in out and len(_records(run)) == n  # nothing evaluated or written

    # raising the horizon alone is refused with the exact command, and config.yaml is left as it was
    assert _main(args + ["train.max_steps=16"]) == 2
    out = capsys.readouterr().out
    assert "schedule.on_extend=continue" in out and "train.max_steps=16" in out
    assert (run / "config.yaml").read_text() == saved_config

    # continue: the LR goes on from where it was, down to min_lr at the new end; no jump back up
    assert _main(args + ["train.max_steps=16", "schedule.on_extend=continue"]) == 0
    out = capsys.readouterr().out
    assert f"learning rate: step 10 ran at {lr10:.3g}" in out
    lrs = {r["step"]: r["lr"] for r in _records(run) if "lr" in r}
    jump = lr_at(10, OptimizerConfig(lr=3e-3, min_lr=3e-4), ScheduleConfig(warmup_steps=2), 16)
    assert lrs[11] <= lr10 + 1e-12 and abs(lrs[11] - lr10) < 0.1 * (jump - lr10)
    assert all(lrs[s + 1] <= lrs[s] + 1e-12 for s in range(10, 16)) and lrs[16] >= 3e-4
    assert "extend_step: 9" in (run / "config.yaml").read_text()

    # the extended run resumes as itself (a requeue with the same command line)
    assert _main(args + ["train.max_steps=16", "schedule.on_extend=continue"]) == 0
    assert "already at step 16" in capsys.readouterr().out

    # evaluate only: valid, test and another dataset, loss and perplexity into metrics.jsonl
    # (any train.max_steps: nothing is trained, so the schedule is not compared)
    assert _main(args + ["train.max_steps=99", "--eval-only", f"eval.datasets=[{pattern_dataset}]"]) == 0
    assert "extend_step: 9" in (run / "config.yaml").read_text()  # an evaluation does not rewrite the run's config
    evals = [r for r in _records(run) if r.get("eval_only")]
    assert [r["split"] for r in evals] == ["valid", "test", f"eval:{pattern_dataset}"]
    assert all(r["step"] == 16 and math.isclose(r["split_ppl"], math.exp(r["split_loss"])) for r in evals)
    assert _main(args + ["train.max_steps=16", "--eval-only", f"run.dir={tmp_path / 'empty'}"]) == 2
    assert "no checkpoint to evaluate" in capsys.readouterr().out


# --------------------------------------------------------------------------- silent waits and noise


def test_help_and_dry_run_never_import_deepspeed():
    # its import alone printed "Setting accelerator to CPU" on every rank, and took seconds
    import subprocess
    import sys

    code = ("import sys; from megatrain.train import main; main(['--help-config']); main(['--dry-run']); "
            "sys.stderr.write('DEEPSPEED IMPORTED' if 'deepspeed' in sys.modules else 'clean')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert res.returncode == 0, res.stderr
    assert res.stderr.endswith("clean") and "Setting accelerator" not in res.stdout + res.stderr


def test_deepspeed_prints_go_to_debug_and_op_builds_are_announced(caplog, tmp_path, monkeypatch):
    import logging

    from megatrain.telemetry import ds_output

    with caplog.at_level(logging.DEBUG, "megatrain"):
        with ds_output.deepspeed_prints_to_debug():
            print("MA 0.04 GB         Max_MA 0.05 GB")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.DEBUG,
                                                                     "deepspeed: MA 0.04 GB         Max_MA 0.05 GB")]
    monkeypatch.setattr(ds_output, "_build_dir", lambda name: tmp_path / name)
    caplog.clear()
    with caplog.at_level(logging.INFO, "megatrain"):
        ds_output.announce_op_build("fused_adam", "FusedAdam GPU kernels")
        (tmp_path / "fused_adam").mkdir()
        (tmp_path / "fused_adam" / "fused_adam.so").write_bytes(b"")
        ds_output.announce_op_build("fused_adam", "FusedAdam GPU kernels")  # built: nothing to say
    assert len(caplog.records) == 1 and "compiling DeepSpeed's fused_adam op" in caplog.text
    assert "once per machine" in caplog.text


def test_one_process_skips_the_shared_memory_op():
    import deepspeed.ops

    from megatrain.engine.build import _prepare_comm_ops
    from megatrain.telemetry import ds_output

    _prepare_comm_ops(world_size=1, local_world_size=1)
    assert deepspeed.ops.__compatible_ops__[ds_output.SHM_OP] is False
