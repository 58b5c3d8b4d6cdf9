"""The main command: start-up errors name the field before data loads; bf16 tracks fp32."""

import json
import os

import pytest
import torch

from megatrain.launch.testing import run_distributed
from megatrain.train import main
from tests.conftest import build_pattern_dataset
from tests.tiny import tiny_run

BASE = ["model.preset=debug", "train.seq_len=32", "train.max_steps=2", "train.resume=never",
        "eval.steps=0", "eval.sample_tokens=0", "checkpoint.save_at_end=false"]


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _fails(capsys, args: list[str], *needles: str) -> str:
    # main() exports the launch variables it discovered (DeepSpeed reads them); a second in-process
    # call must not mistake them for a launcher's.
    for k in LAUNCH_VARS:
        os.environ.pop(k, None)
    assert main(args) == 2
    out = capsys.readouterr().out
    for n in needles:
        assert n in out, f"{n!r} not in:\n{out}"
    return out


def test_batch_not_divisible_fails_before_data(capsys, tmp_path):
    out = _fails(capsys, BASE + [f"run.dir={tmp_path}", "data.path=/nonexistent/ds", "train.micro_batch_size=4",
                                 "train.global_batch_size=10"], "train.global_batch_size=10", "use train.global_batch_size=8")
    assert "/nonexistent" not in out  # the batch error came first: no data was opened


def test_zero3_with_pipeline_is_refused(capsys, tmp_path):
    _fails(capsys, BASE + [f"run.dir={tmp_path}", "data.path=/nonexistent/ds", "parallel.pipeline=2",
                           "deepspeed.zero_stage=3"], "does not support ZeRO-2/3")


def test_template_that_contradicts_the_config(capsys, tmp_path):
    tpl = tmp_path / "mine.json"
    tpl.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 8}))
    _fails(capsys, BASE + [f"run.dir={tmp_path}", "data.path=/nonexistent/ds", f"deepspeed.template={tpl}"],
           "train_micro_batch_size_per_gpu", str(tpl))
    tpl.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    _fails(capsys, BASE + [f"run.dir={tmp_path}", "data.path=/nonexistent/ds", f"deepspeed.template={tpl}"],
           "zero_optimization.stage=2", "deepspeed.zero_stage=1")


@pytest.mark.parametrize("template,needle", [
    ([1, 2], "must be JSON objects"),
    ({"zero_optimization": 5}, "must be JSON objects"),
    ({"bfloat16": {"enabled": True}}, "sets 'bfloat16'"),  # DeepSpeed's alias of bf16: precision is ours
    ({"zero_optimization": {"reduce_bucket_size": -5}}, "reduce_bucket_size: Input should be greater than 0"),
    ({"zero_optimization": {"bogus_key": 1}}, "bogus_key: Extra inputs are not permitted"),
])
def test_malformed_template_is_refused_before_data(capsys, tmp_path, template, needle):
    tpl = tmp_path / "mine.json"
    tpl.write_text(json.dumps(template))
    out = _fails(capsys, BASE + [f"run.dir={tmp_path}", "data.path=/nonexistent/ds", f"deepspeed.template={tpl}"],
                 needle, str(tpl))
    assert "/nonexistent" not in out


def test_output_dir_that_is_a_file_is_refused_before_data(capsys, tmp_path):
    (tmp_path / "f").write_text("not a directory")
    for key, value in [("run.dir", tmp_path / "f"), ("run.dir", tmp_path / "f" / "run"),
                       ("data.cache_dir", tmp_path / "f")]:
        args = [f"run.dir={tmp_path / 'run'}", f"{key}={value}", "data.path=/nonexistent/ds"]
        _fails(capsys, BASE + args, f"{key}: {tmp_path / 'f'} is a file")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")  # else found only by the final save, after all steps
    _fails(capsys, BASE + [f"run.dir={tmp_path / 'run'}", "data.path=/nonexistent/ds"], "checkpoints as a directory")


def test_fp16_on_cpu_is_refused(capsys, tmp_path):
    _fails(capsys, BASE + [f"run.dir={tmp_path}", "train.precision=fp16"], "train.precision=fp16 needs a GPU")


def test_missing_dataset_names_the_file(capsys, tmp_path):
    _fails(capsys, BASE + [f"run.dir={tmp_path}", f"data.path={tmp_path}/nope"], f"{tmp_path}/nope")


def test_vocab_larger_than_model_is_refused(capsys, tmp_path):
    prefix = build_pattern_dataset(str(tmp_path / "big"), vocab=1000, docs=20)
    _fails(capsys, BASE + [f"run.dir={tmp_path}", f"data.path={prefix}"], "vocab_size", "model.vocab_size=512")


def test_token_outside_the_vocabulary_stops_training_with_the_file_named(capsys, tmp_path):
    prefix = build_pattern_dataset(str(tmp_path / "big"), vocab=1000, docs=20)
    os.remove(prefix + ".json")  # no sidecar: nothing at start says which vocabulary the tokens come from
    out = _fails(capsys, BASE + [f"run.dir={tmp_path}", f"data.path={prefix}", "train.micro_batch_size=2"],
                 f"{prefix}.bin: sample", "outside the vocabulary [0, 512)")
    assert "IndexError" not in out


def test_tokenizer_that_disagrees_with_the_sidecar(capsys, tmp_path):
    from megatrain.data.indexed import IndexedDatasetBuilder
    from megatrain.data.tokenizer import train_tokenizer

    words = ["alpha beta gamma delta", "the quick brown fox jumps", "lorem ipsum dolor sit amet"] * 200
    model_a = train_tokenizer(words, 300, str(tmp_path / "a"))
    with IndexedDatasetBuilder(str(tmp_path / "ds"), 512) as b:
        for i in range(50):
            b.add_sequence(list(range(i, i + 60)))
            b.end_document()
        b.finalize(tokenizer_sha256="0" * 64, eod_id=2)
    _fails(capsys, BASE + [f"run.dir={tmp_path}", f"data.path={tmp_path}/ds", f"data.tokenizer={model_a}"],
           "tokenizer_sha256", "data.tokenizer")


def _bf16_vs_fp32(data: str, run_dir: str) -> dict:
    from megatrain.config import load_config
    from megatrain.parallel.state import ParallelState
    from megatrain.train import train_with

    out = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(None, tiny_run(data, f"{run_dir}/{precision}", 20, "train.micro_batch_size=4",
                                         f"train.precision={precision}", "train.resume=never",
                                         "checkpoint.save_at_end=false"))
        tr = train_with(cfg, ParallelState.build(1, 1), torch.device("cpu"))
        out[precision] = [r["loss"] for r in tr.history if "loss" in r]
    return out


def test_bf16_tracks_fp32_on_cpu(pattern_dataset, tmp_path):
    got = run_distributed(_bf16_vs_fp32, 1, pattern_dataset, str(tmp_path))[0]
    assert len(got["bf16"]) == 20
    assert got["fp32"][-1] < got["fp32"][0] - 0.3
    worst = max(abs(b - f) / f for b, f in zip(got["bf16"], got["fp32"]))
    assert worst <= 0.02, worst
    assert got["bf16"] != got["fp32"]  # bf16 really ran in bf16
