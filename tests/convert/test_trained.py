"""End to end with the trainer: the debug preset trained a few steps at TP=2 x PP=2 and at ZeRO-3 DP=2,
exported to Hugging Face; and a converted checkpoint that training continues from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatrain import ckpt_layout as layout
from megatrain.config import Config
from megatrain.testing import run_distributed
from tests.convert.conftest import assert_hf_export_matches, convert

pytest.importorskip("transformers")

STEPS = 3
LAYOUTS = {
    "tp2pp2": (4, ["train.micro_batch_size=2", "parallel.tensor=2", "parallel.pipeline=2"]),
    "zero3": (2, ["train.micro_batch_size=2", "deepspeed.zero_stage=3"]),
}


def _train(data: str, run_dir: str, tokenizer: str, extra: list[str]) -> int:
    import torch.distributed as dist

    from megatrain.config import load_config
    from megatrain.parallel.state import ParallelState
    from megatrain.train import train_with

    cfg = load_config(None, [
        "model.preset=debug", f"data.path={data}", "data.split=100,0,0", f"data.tokenizer={tokenizer}",
        f"run.dir={run_dir}", f"train.max_steps={STEPS}", "train.seq_len=32", "train.global_batch_size=4",
        "train.precision=fp32", "train.resume=never", "logging.interval=1", "eval.steps=0", "eval.sample_tokens=0",
        "optimizer.lr=3e-3", "schedule.warmup_steps=1", *extra])
    st = ParallelState.build(cfg.parallel.tensor, cfg.parallel.pipeline)
    tr = train_with(cfg, st, torch.device("cpu"))
    dist.barrier()
    return tr.step


@pytest.fixture(scope="module")
def trained(pattern_dataset, tokenizer_path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    for name, (world, extra) in LAYOUTS.items():
        steps = run_distributed(_train, world, pattern_dataset, str(root / name), str(tokenizer_path), extra)
        assert steps == [STEPS] * world
    return root


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_hf_export_of_a_trained_checkpoint(trained, tokenizer_path, tmp_path, name):
    ckpt = layout.find_resume_checkpoint(trained / name / "checkpoints")
    meta, weights = layout.load_canonical_weights(ckpt, verify="full")
    topo = meta["topology"]
    assert meta["step"] == STEPS and not meta["weights_only"]
    assert (topo["tp"], topo["pp"], topo["dp"], topo["zero_stage"]) == \
        ((2, 2, 1, 1) if name == "tp2pp2" else (1, 1, 2, 3))
    # the run directory is enough: the newest checkpoint and the recorded tokenizer are found
    assert convert(trained / name, tmp_path / "hf", "--to", "hf") == 0
    cfg = Config.from_dict(meta["config"])
    assert_hf_export_matches(tmp_path / "hf", cfg, weights, tokenizer_path)


def _resume(data: str, run_dir: str, tokenizer: str, ckpt: str) -> int:
    # An Adam step moves a weight by at most lr; 1e-30 is far below the spacing of fp32 numbers around
    # these weights, so what the run saves after one step is exactly what it loaded.
    return _train(data, run_dir, tokenizer, ["train.micro_batch_size=2", "parallel.tensor=2", "train.max_steps=1",
                                             f"train.resume={ckpt}", "optimizer.lr=1e-30", "optimizer.min_lr=1e-30"])


def test_training_continues_from_a_converted_hf_checkpoint(trained, pattern_dataset, tokenizer_path, tmp_path):
    assert convert(trained / "tp2pp2", tmp_path / "hf", "--to", "hf", "--no-verify") == 0
    assert convert(tmp_path / "hf", tmp_path / "mt", "--to", "megatrain", "--tp", "2") == 0
    _, converted = layout.load_canonical_weights(tmp_path / "mt")
    run_distributed(_resume, 2, pattern_dataset, str(tmp_path / "run"), str(tokenizer_path), str(tmp_path / "mt"))
    saved = layout.find_resume_checkpoint(tmp_path / "run" / "checkpoints")
    meta, after = layout.load_canonical_weights(saved)
    assert meta["step"] == 1 and meta["topology"]["tp"] == 2
    assert set(after) == set(converted)
    for k in converted:
        assert torch.equal(after[k], converted[k]), k
