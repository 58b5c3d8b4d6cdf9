"""Training with the sequence split (CP=2 x TP=2 with sequence parallelism, ZeRO-1, 4 ranks) follows the
one-process loss curve (1e-5); its checkpoint records the context degree, resumes on one process and
continues the same curve (1e-5), resumes bit for bit at its own topology, and converts to Hugging Face
with logits matching megatrain's."""

from __future__ import annotations

import pytest
import torch

from megatrain.launch.testing import run_distributed
from tests.tiny import tiny_run

STEPS, SAVED = 6, 3
RTOL = 1e-5
SPLIT = ["parallel.context=2", "parallel.tensor=2", "parallel.sequence_parallel=true"]


def _train(data: str, run_dir: str, extra: list[str]) -> dict[int, float]:
    import torch.distributed as dist

    from megatrain.config import load_config
    from megatrain.parallel.state import ParallelState
    from megatrain.train import train_with

    cfg = load_config(None, tiny_run(data, run_dir, STEPS, "train.micro_batch_size=2",
                                     f"checkpoint.interval={SAVED}", "checkpoint.keep_last=0",
                                     "checkpoint.save_at_end=false", *extra))
    p = cfg.parallel
    tr = train_with(cfg, ParallelState.build(p.tensor, p.pipeline, p.context), torch.device("cpu"))
    dist.barrier()
    return {r["step"]: r["loss"] for r in tr.history if "loss" in r}


@pytest.fixture(scope="module")
def runs(pattern_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("context_resume")
    ckpt = root / "split" / "checkpoints" / f"step_{SAVED:08d}"
    split = run_distributed(_many, 4, pattern_dataset, str(root), {
        "split": SPLIT, "split_native": SPLIT + [f"train.resume={ckpt}"]}, timeout_s=600)[0]
    one = run_distributed(_many, 1, pattern_dataset, str(root), {"one": [], "resumed": [f"train.resume={ckpt}"]})[0]
    return split, one["resumed"], ckpt, one["one"]


def _many(data: str, root: str, runs: dict[str, list[str]]) -> dict[str, dict[int, float]]:
    return {name: _train(data, f"{root}/{name}", extra) for name, extra in runs.items()}


def test_split_training_follows_one_process(runs):
    split, _, _, one = runs
    native, split = split["split_native"], split["split"]
    # at the same topology DeepSpeed's own files resume it bit for bit
    assert sorted(native) == list(range(SAVED + 1, STEPS + 1))
    assert all(native[s] == split[s] for s in native), (native, split)
    assert sorted(split) == sorted(one) == list(range(1, STEPS + 1))
    errs = {s: abs(split[s] - one[s]) / abs(one[s]) for s in one}
    assert max(errs.values()) <= RTOL, f"CP=2 x TP=2 + SP vs 1 process: relative loss errors {errs}"


def test_resumed_on_one_process_continues_the_curve(runs):
    split, resumed, ckpt, _ = runs
    split = split["split"]
    from megatrain.checkpoint import layout

    topo = layout.read_meta(ckpt)["topology"]
    assert (topo["tp"], topo["cp"], topo["dp"]) == (2, 2, 1), topo
    assert sorted(resumed) == list(range(SAVED + 1, STEPS + 1))
    errs = {s: abs(resumed[s] - split[s]) / abs(split[s]) for s in resumed}
    assert max(errs.values()) <= RTOL, f"CP=2 x TP=2 + SP -> 1 process: relative loss errors {errs}"


def test_converts_to_hf_with_matching_logits(runs, tmp_path):
    pytest.importorskip("transformers")
    from megatrain.checkpoint import layout
    from megatrain.config import Config
    from megatrain.convert import verify
    from tests.convert.conftest import convert

    _, _, ckpt, _ = runs
    meta, weights = layout.load_canonical_weights(ckpt, verify="full")
    assert meta["topology"]["cp"] == 2
    assert convert(ckpt, tmp_path / "hf", "--to", "hf", "--no-tokenizer", "--no-verify") == 0  # compared below
    cfg = Config.from_dict(meta["config"])
    tokens = verify.probe_tokens(cfg.model.vocab_size, 32)
    ours, theirs = verify.megatrain_runner(cfg.model, weights), verify.hf_runner(tmp_path / "hf")
    diff = (ours(tokens) - theirs(tokens)).abs().max().item()
    assert diff <= 1e-4, diff
