"""The quickstart's main command, shortened: the loss falls, a sample is printed, artefacts exist."""

import json
import math
import os

from megatrain.train import main


def test_demo_learns_samples_and_saves(tmp_path, capsys):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    run = tmp_path / "demo"
    code = main([f"run.dir={run}", "train.max_steps=40", "train.micro_batch_size=4", "logging.interval=1",
                 "eval.interval=20", "eval.steps=2", "eval.sample_tokens=8", "train.resume=never"])
    assert code == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    samples = [r["samples"] for r in records if "samples" in r]
    assert len(losses) == 40 and len(evals) >= 2 and samples
    ln_v = math.log(4096)
    assert abs(losses[0] - ln_v) < 0.5, f"first loss {losses[0]:.2f} should start near ln(vocab) = {ln_v:.2f}"
    assert losses[-1] < ln_v - 1.5, f"loss did not fall well below ln(vocab): {losses[-1]:.2f}"
    assert "sample @ step 40" in out and "step 40/40 (100.0%) | loss" in out
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_00000040"] and (ckpts[0] / "COMPLETE").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000040"
    assert (run / "config.yaml").is_file()
