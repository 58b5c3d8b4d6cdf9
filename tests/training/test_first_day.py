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
    assert "is the --config file: left as it is" in capsys.readouterr().out


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
