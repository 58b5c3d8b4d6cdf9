"""Checkpoints of layout version 1 (DeepSpeed's ds/ next to model/, optim/, rng/), as megatrain wrote
them before each tensor was stored once: ``fixtures/v1_ds`` was saved by that code (commit 4d869d2,
``fixtures/make_v1_checkpoint.py``). Today's code resumes it (DeepSpeed's files at its own topology,
the canonical files at another) and converts it to Hugging Face."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatrain.checkpoint import layout
from megatrain.launch.testing import run_distributed
from tests.checkpoint.fixtures.make_v1_checkpoint import SAVED, STEPS, VOCAB, run_args
from tests.conftest import build_pattern_dataset

FIXTURES = Path(__file__).parent / "fixtures"
V1 = FIXTURES / "v1_ds"


def _resume(data: str, run_dir: str, extra: list[str]) -> dict:
    from megatrain.config import load_config
    from megatrain.parallel.state import ParallelState
    from megatrain.train import train_with

    cfg = load_config(None, run_args(data, run_dir, "checkpoint.interval=0", *extra))
    tr = train_with(cfg, ParallelState.build(1, 1), torch.device("cpu"))
    return {r["step"]: r["loss"] for r in tr.history if "loss" in r}


@pytest.fixture(scope="module")
def v1_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("v1")
    data = build_pattern_dataset(str(root / "pattern"), vocab=VOCAB)
    runs = {}
    for name, extra in (("same", []), ("zero2", ["deepspeed.zero_stage=2"])):
        ckpts = root / name / "checkpoints"
        shutil.copytree(V1, ckpts / layout.tag_for_step(SAVED))
        layout.update_latest(ckpts, layout.tag_for_step(SAVED))
        runs[name] = (root / name, run_distributed(_resume, 1, data, str(root / name), extra)[0])
    return runs


def test_fixture_is_a_version_1_checkpoint():
    meta = layout.read_meta(V1)
    assert meta["version"] == 1 and (V1 / "ds").is_dir() and (V1 / "optim").is_dir()
    layout.verify_manifest(V1, "full")


@pytest.mark.parametrize("name, rtol", [("same", 0.0), ("zero2", 1e-5)])
def test_version_1_checkpoint_resumes(v1_runs, name, rtol):
    """At its own topology through DeepSpeed's files (bitwise on the machine that made it; other CPUs may
    round differently, hence the 1e-6 floor); at ZeRO-2 through the canonical files."""
    want = {int(k): v for k, v in json.loads((FIXTURES / "v1_ds_losses.json").read_text()).items()}
    run, got = v1_runs[name]
    assert sorted(got) == list(range(SAVED + 1, STEPS + 1))
    errs = {s: abs(got[s] - want[s]) / want[s] for s in got}
    assert max(errs.values()) <= max(rtol, 1e-6), errs
    final = run / "checkpoints" / layout.tag_for_step(STEPS)
    assert layout.read_meta(final)["version"] == layout.VERSION and not (final / "ds").exists()


def test_version_1_checkpoint_converts_to_hf(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from megatrain.convert import verify
    from tests.convert.conftest import convert

    assert convert(V1, tmp_path / "hf", "--to", "hf", "--no-tokenizer") == 0
    meta, weights = layout.load_canonical_weights(V1)
    ours = verify.megatrain_runner(layout.model_config_of(meta), weights)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    tokens = verify.probe_tokens(VOCAB, 16)
    with torch.no_grad():
        assert (ours(tokens) - hf(input_ids=tokens).logits).abs().max().item() <= 1e-5
