"""End to end with the trainer: the debug preset trained a few steps at TP=2 x PP=2 and at ZeRO-3 DP=2,
exported to Hugging Face; and a converted checkpoint that training continues from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatrain.checkpoint import layout
from megatrain.checkpoint.select import find_checkpoint
from megatrain.config import Config
from megatrain.launch.testing import run_distributed
from tests.convert.conftest import assert_hf_export_matches, convert, make_hf_llama
from tests.tiny import tiny_run

pytest.importorskip("transformers")

STEPS = 3
LAYOUTS = {
    "tp2pp2": (4, ["train.micro_batch_size=2", "parallel.tensor=2", "parallel.pipeline=2"]),
    "zero3": (2, ["train.micro_batch_size=2", "deepspeed.zero_stage=3"]),
}


def _train(data: str, tokenizer: str, runs: list[tuple[str, list[str]]]) -> list[int]:
    """Train each (run_dir, overrides) in turn in this process group; the steps each reached."""
    import torch.distributed as dist

    from megatrain.config import load_config
    from megatrain.parallel.state import ParallelState
    from megatrain.train import train_with

    steps = []
    for run_dir, extra in runs:
        cfg = load_config(None, [
            *tiny_run(data, run_dir, STEPS, f"data.tokenizer={tokenizer}", "train.resume=never",
                      "schedule.warmup_steps=1", *extra)])
        st = ParallelState.build(cfg.parallel.tensor, cfg.parallel.pipeline)
        steps.append(train_with(cfg, st, torch.device("cpu")).step)
        dist.barrier()
    return steps


# An Adam step moves a weight by at most lr; 1e-30 is far below the spacing of fp32 numbers around these
# weights, so what the resumed run saves after one step is exactly what it loaded.
RESUME = ["train.micro_batch_size=2", "parallel.tensor=2", "train.max_steps=1", "optimizer.lr=1e-30",
          "optimizer.min_lr=1e-30"]


@pytest.fixture(scope="module")
def trained(pattern_dataset, tokenizer_path, tmp_path_factory) -> Path:
    """Runs: tp2pp2 and zero3 (trained), and "resumed": one step at TP=2 from an HF Llama converted to a
    megatrain checkpoint (made before the ranks start, resumed in the same processes as zero3)."""
    root = tmp_path_factory.mktemp("trained")
    make_hf_llama(root / "hf_src", tokenizer_path)
    assert convert(root / "hf_src", root / "from_hf", "--to", "megatrain", "--tp", "2") == 0
    world, extra = LAYOUTS["tp2pp2"]
    assert run_distributed(_train, world, pattern_dataset, str(tokenizer_path), [(str(root / "tp2pp2"), extra)]) \
        == [[STEPS]] * world
    world, extra = LAYOUTS["zero3"]
    runs = [(str(root / "zero3"), extra), (str(root / "resumed"), RESUME + [f"train.resume={root / 'from_hf'}"])]
    assert run_distributed(_train, world, pattern_dataset, str(tokenizer_path), runs) == [[STEPS, 1]] * world
    return root


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_hf_export_of_a_trained_checkpoint(trained, tokenizer_path, tmp_path, name):
    ckpt = find_checkpoint(trained / name / "checkpoints", verify="sizes")
    meta, weights = layout.load_canonical_weights(ckpt, verify="full")
    topo = meta["topology"]
    assert meta["step"] == STEPS and not meta["weights_only"]
    assert (topo["tp"], topo["pp"], topo["dp"], topo["zero_stage"]) == \
        ((2, 2, 1, 1) if name == "tp2pp2" else (1, 1, 2, 3))
    # the run directory is enough: the newest checkpoint and the recorded tokenizer are found
    assert convert(trained / name, tmp_path / "hf", "--to", "hf") == 0
    cfg = Config.from_dict(meta["config"])
    assert_hf_export_matches(tmp_path / "hf", cfg, weights, tokenizer_path)


def test_training_continues_from_a_converted_hf_checkpoint(trained):
    _, converted = layout.load_canonical_weights(trained / "from_hf")
    saved = find_checkpoint(trained / "resumed" / "checkpoints", verify="sizes")
    meta, after = layout.load_canonical_weights(saved)
    assert meta["step"] == 1 and meta["topology"]["tp"] == 2
    assert set(after) == set(converted)
    for k in converted:
        assert torch.equal(after[k], converted[k]), k
