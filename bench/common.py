"""What the benchmark scripts share: the two shapes, step timing and the result record."""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable

import torch

PEAK_TFLOPS = 989.0  # H100/H200 SXM datasheet dense bf16, the MFU denominator for both GPUs

# name -> (megatrain preset, sequence length, baseline_hf_ds.py arguments)
SHAPES = {
    "tinyllama": ("tinyllama-1.1b", 2048,
                  "--hidden 2048 --layers 22 --heads 32 --kv 4 --ffn 5632 --vocab 32000 --seq 2048"),
    "llama3.2-1b": ("llama3.2-1b", 4096,
                    "--hidden 2048 --layers 16 --heads 32 --kv 8 --ffn 8192 --vocab 128256 --seq 4096 --tie"),
    # the debug preset, for checking the bench scripts themselves on a CPU (no figures from it)
    "toy": ("debug", 128, "--hidden 64 --layers 2 --heads 4 --kv 2 --ffn 160 --vocab 512 --seq 128"),
}


def device() -> torch.device:
    """The GPU when there is one; the CPU otherwise (toy-size checks of the scripts)."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else 0.0


def time_steps(step: Callable[[int], None], steps: int, warmup: int) -> list[float]:
    """Wall time of each step, synchronised before and after (what the baseline script does);
    returns the times after ``warmup`` steps."""
    times = []
    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - t0)
    return times[warmup:]


def summarize(times: list[float], tokens_per_step: int, flops_per_token: float) -> dict:
    """tokens/s, TFLOP/s and MFU from the median step; spread as min, max and (max-min)/median."""
    med = statistics.median(times)
    tflops = flops_per_token * tokens_per_step / med / 1e12
    return {"step_s_median": round(med, 4), "step_s_min": round(min(times), 4), "step_s_max": round(max(times), 4),
            "spread_pct": round(100 * (max(times) - min(times)) / med, 1), "n_timed": len(times),
            "tok_s": round(tokens_per_step / med), "tflops": round(tflops, 1),
            "mfu_vs_989": round(tflops / PEAK_TFLOPS, 4)}


def emit(result: dict) -> None:
    """One machine-readable line the orchestrator collects."""
    print("RESULT " + json.dumps(result), flush=True)


def single_process_env() -> None:
    """Rank 0 of 1 for DeepSpeed's init when no launcher set the variables."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")


def gpu_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
