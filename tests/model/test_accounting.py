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
