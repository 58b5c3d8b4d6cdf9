"""The dry run's memory estimate against peaks measured on an H200 (docs/benchmarks.md, issue 8)."""

import pytest

from megatrain.config import load_config
from megatrain.model.accounting import estimate_memory

# (preset, seq, micro-batch, activation checkpointing, measured torch.cuda.max_memory_allocated in GiB),
# megatrain through the engine, ZeRO-1, bf16, one H200 (bench/run_bench.py, 2026-11-21)
MEASURED = [
    ("tinyllama-1.1b", 2048, 16, "none", 59.4),
    ("tinyllama-1.1b", 2048, 32, "none", 100.2),
    ("tinyllama-1.1b", 2048, 16, "selective", 49.7),
    ("llama3.2-1b", 4096, 4, "none", 40.4),
    ("llama3.2-1b", 4096, 8, "none", 59.5),
    ("llama3.2-1b", 4096, 16, "none", 97.7),
    ("llama3.2-1b", 4096, 16, "selective", 79.2),
]


@pytest.mark.parametrize("preset,seq,mb,ckpt,measured", MEASURED)
def test_estimate_within_15_percent_of_measured_peak(preset, seq, mb, ckpt, measured):
    cfg = load_config(None, [f"model.preset={preset}"])
    est = estimate_memory(cfg.model, seq_len=seq, micro_batch=mb, tp=1, pp=1, dp=1, zero_stage=1, offload="none",
                          precision="bf16", checkpointing=ckpt)["total"] / 2**30
    assert abs(est - measured) / measured <= 0.15, f"estimate {est:.1f} GiB vs measured {measured} GiB"


def test_recomputation_orders_the_estimates():
    cfg = load_config(None, ["model.preset=llama2-7b"])
    acts = {ck: estimate_memory(cfg.model, seq_len=4096, micro_batch=1, tp=2, pp=1, dp=1, zero_stage=1,
                                offload="none", precision="bf16", checkpointing=ck)["activations"]
            for ck in ("none", "selective", "full")}
    assert acts["full"] < acts["selective"] < acts["none"]


def _est(**kw):
    cfg = load_config(None, ["model.preset=llama3.1-8b"])
    args = dict(seq_len=131072, micro_batch=1, tp=1, pp=1, dp=4, zero_stage=3, offload="none", precision="bf16")
    return estimate_memory(cfg.model, **{**args, **kw})


def test_sequence_and_context_parallel_divide_what_they_split():
    h, s, layers = 4096, 131072, 32
    # Korthikanti et al. 2022, 16-bit, flash attention: s b h (10 + 24/t) without SP, s b h 34/t with it
    assert _est(tp=4)["activations"] == layers * s * h * (10 + 24 / 4)
    assert _est(tp=4, sequence_parallel=True)["activations"] == layers * s * h * 34 / 4
    # each context rank holds s/cp tokens of every activation; ZeRO shards over data x context
    cp1, cp8 = _est(), _est(cp=8)
    assert cp8["activations"] == cp1["activations"] / 8
    assert cp8["weights"] == cp1["weights"] / 8 and cp8["optimizer"] == cp1["optimizer"] / 8


def test_dry_run_plans_llama3_8b_at_128k_with_context_8(capsys):
    from megatrain.train import main

    assert main(["--dry-run", "--world-size", "32", "model.preset=llama3.1-8b", "train.seq_len=131072",
                 "train.micro_batch_size=1", "parallel.context=8"]) == 0
    out = capsys.readouterr().out
    assert "TP 1 x CP 8 x PP 1 x DP 4" in out and "16,384 per context rank" in out
    assert "memory per GPU (estimate):" in out
