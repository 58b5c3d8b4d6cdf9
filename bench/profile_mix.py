"""Where a training step's GPU time goes: kernels grouped by kind, from torch.profiler."""

from __future__ import annotations

from typing import Callable

import torch

# first match wins; names are lower-cased kernel names
CATEGORIES = (
    ("attention", ("flash", "fmha", "sdpa", "cudnn", "attention")),
    ("optimizer", ("multi_tensor", "adam", "l2norm", "norm_kernel")),
    ("nccl", ("nccl",)),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "gmma")),
    ("triton", ("triton",)),
    ("copy/cast/fill", ("copy", "cast", "memcpy", "memset", "fill", "cat_")),
    ("elementwise/reduce", ("elementwise", "vectorized", "reduce", "unrolled", "index")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_steps(step: Callable[[int], None], n: int, top: int = 30) -> dict:
    """Run ``n`` steps under the profiler; print the top kernels; return ms per step by category."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            step(i)
        torch.cuda.synchronize()
    # GPU-side user annotations (e.g. "Optimizer.step#FusedAdam.step") span kernels already counted
    kernels = [e for e in prof.key_averages() if getattr(e, "device_type", None) == DeviceType.CUDA
               and not e.key.startswith(("Optimizer.", "ProfilerStep"))]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    mix: dict[str, float] = {}
    for e in kernels:
        c = category(e.key)
        mix[c] = mix.get(c, 0.0) + e.self_device_time_total / 1e3 / n
    total = sum(mix.values())
    print(f"profile: {total:.1f} ms of kernels per step; top {top} kernels (ms/step, calls/step):")
    for e in kernels[:top]:
        print(f"  {e.self_device_time_total / 1e3 / n:8.2f}  {e.count / n:6.0f}  [{category(e.key)}] {e.key[:110]}")
    out = {k: round(v, 2) for k, v in sorted(mix.items(), key=lambda kv: -kv[1])}
    out["total"] = round(total, 2)
    print("profile mix (ms/step): " + ", ".join(f"{k} {v}" for k, v in out.items()), flush=True)
    return out
