"""Issue 16, class 1: the final save comes before the final evaluation and samples; optional work that fails
(or a padded vocabulary that samples could draw from) never costs a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from megatrain.launch.testing import run_distributed
from tests.conftest import build_pattern_dataset
from tests.tiny import tiny_run


def _train(data: str, run_dir: str, tokenizer: str, broken_eval: bool) -> dict:
    from megatrain.config import load_config
    from megatrain.parallel.state import ParallelState
    from megatrain.train import train_with
    from megatrain.trainer import Trainer

    if broken_eval:
        def evaluate(self):
            raise OSError(28, "No space left on device", "metrics.jsonl")  # e.g. the metrics disk filled up
        Trainer.evaluate = evaluate
    cfg = load_config(None, tiny_run(data, run_dir, 2, "data.split=90,10,0", "eval.steps=1", "eval.sample_tokens=12",
                                     "eval.prompts=[alpha, beta]", f"data.tokenizer={tokenizer}",
                                     "train.resume=never"))
    tr = train_with(cfg, ParallelState.build(1, 1), torch.device("cpu"))
    return {"code": tr.exit_code}


def test_samples_of_a_padded_vocabulary_and_a_failing_evaluation_cost_no_checkpoint(tmp_path):
    from megatrain.data.tokenizer import Tokenizer, train_tokenizer

    words = ["alpha beta gamma delta", "the quick brown fox jumps", "lorem ipsum dolor sit amet"] * 100
    tok = train_tokenizer(words, 300, str(tmp_path / "tok"), num_threads=1)  # the debug model has 512 rows
    data = build_pattern_dataset(str(tmp_path / "data"), vocab=300, docs=60)
    run = tmp_path / "run"
    got = run_distributed(_train, 1, data, str(run), tok, True)[0]
    assert got["code"] == 0
    assert (run / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    assert '"samples"' in Path(run / "metrics.jsonl").read_text()  # the samples ran after the evaluation failed
    Tokenizer(tok)
