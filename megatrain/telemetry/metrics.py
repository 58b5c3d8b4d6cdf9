"""Throughput arithmetic, the console line, metrics.jsonl and wandb."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

from megatrain.telemetry.jsonl import open_for_append

log = logging.getLogger(__name__)

# Dense bf16 peak of the datasheet, the figure MFU is quoted against (H100 SXM and H200 alike).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def device_peak_tflops() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def human_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def human_duration(s: float) -> str:
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def human_flops(tflops: float) -> str:
    """Achieved FLOP/s per device in a unit that shows it: a CPU or a tiny model makes well under
    one TFLOP/s, which ``.1f`` TFLOP/s would print as 0.0."""
    for unit, scale in (("TFLOP/s", 1.0), ("GFLOP/s", 1e3), ("MFLOP/s", 1e6)):
        if tflops * scale >= 1.0:
            return f"{tflops * scale:.1f} {unit}"
    return f"{tflops * 1e6:.2f} MFLOP/s"


def format_step_line(rec: dict[str, Any], max_steps: int, elapsed: float, eta: float) -> str:
    """`step 512/10000 (5.1%) | loss 7.0701 | ppl 1176.2 | lr 1.50e-04 | grad_norm 0.255 | tokens 16.8M |
    142,851 tok/s | 312 TFLOP/s | MFU 31.5% | mem 23.1 GiB | 58s elapsed | eta 1h02m`"""
    parts = [f"step {rec['step']}/{max_steps} ({100 * rec['step'] / max_steps:.1f}%)",
             f"loss {rec['loss']:.4f}", f"ppl {rec['ppl']:.1f}", f"lr {rec['lr']:.2e}"]
    if rec.get("grad_norm") is not None:
        parts.append(f"grad_norm {rec['grad_norm']:.3f}")
    parts += [f"tokens {human_count(rec['tokens'])}", f"{rec['tokens_per_s']:,.0f} tok/s",
              human_flops(rec["tflops"])]
    if rec.get("mfu") is not None:
        parts.append(f"MFU {100 * rec['mfu']:.1f}%")
    parts += [f"mem {rec['mem_gib']:.1f} GiB", f"{human_duration(elapsed)} elapsed", f"eta {human_duration(eta)}"]
    if rec.get("skipped"):
        parts.append(f"skipped {rec['skipped']}")
    return " | ".join(parts)


class MetricsSink:
    """metrics.jsonl (appended and flushed per record, so a crash loses nothing) and optionally wandb."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_project: Optional[str], run_name: str,
                 config: dict):
        self.enabled = enabled
        self.file = None
        self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open_for_append(run_dir / "metrics.jsonl")
        if wandb_project:
            self.wandb = _start_wandb(wandb_project, run_name, run_dir, config)

    def write(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"time": round(time.time(), 3), **rec}
        if self.file is not None:
            try:
                self.file.write(json.dumps(rec) + "\n")
                self.file.flush()
            except (OSError, ValueError) as e:  # a full disk, a closed file: metrics must never stop training
                log.warning("writing metrics.jsonl failed (%s); continuing without it", e)
                self.file = None
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=rec.get("step"))
            except Exception as e:  # noqa: BLE001 - wandb must never stop training
                log.warning("wandb logging failed (%s); continuing without it", e)
                self.wandb = None

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:  # noqa: BLE001
                pass


def _start_wandb(project: str, name: str, run_dir: Path, config: dict) -> Any:
    try:
        import wandb
    except ImportError:
        log.warning("logging.wandb_project is set but wandb is not installed; metrics go to metrics.jsonl only")
        return None
    # Without an API key, log offline (sync later with `wandb sync`): the network never blocks training.
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    try:
        return wandb.init(project=project, name=name, dir=str(run_dir), config=config, mode=mode,
                          settings=wandb.Settings(init_timeout=30))
    except Exception as e:  # noqa: BLE001
        log.warning("wandb.init failed (%s); metrics go to metrics.jsonl only", e)
        return None
