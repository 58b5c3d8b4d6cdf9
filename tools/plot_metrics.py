#!/usr/bin/env python3
"""Plot a run's metrics.jsonl: loss and eval loss, learning rate, throughput -> RUN_DIR/metrics.png.

    python tools/plot_metrics.py RUN_DIR [--out FILE.png]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.telemetry.jsonl import read_records  # noqa: E402
from megatrain.telemetry.console import pipe_safe  # noqa: E402


def load_records(path: Path) -> list[dict]:
    records, problems = read_records(path)
    for line in problems[:20]:
        sys.stderr.write(line + "\n")
    return records


def _numbers(r: dict, *keys: str) -> bool:
    return all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for k in keys)


def plot(records: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if _numbers(r, "step", "loss", "lr", "tokens_per_s")]
    evals = [r for r in records if _numbers(r, "step", "eval_loss")]
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[1].set_ylabel("learning rate")
    axes[2].plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
    axes[2].set_ylabel("tokens/s")
    axes[2].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)


PNG_MAGIC = b"\x89PNG"


def check_out(out: Path, metrics: Path) -> str:
    """The plot replaces only a PNG image (an earlier plot), never the metrics it reads or any other file."""
    if out.suffix.lower() != ".png":
        return "the plot is a PNG image; give a .png path"
    if out.is_dir():
        return "is a directory"
    if out.exists():
        if out.resolve() == metrics.resolve():
            return "is the metrics file this tool reads"
        with open(out, "rb") as f:
            if f.read(4) != PNG_MAGIC:
                return "exists and is not a PNG image; choose another path or move the file"
    return ""


@pipe_safe
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    path = a.run_dir / "metrics.jsonl"
    if not path.is_file():
        sys.stderr.write(f"error: {path}: no such file (is {a.run_dir} a megatrain run directory?)\n")
        return 2
    records = load_records(path)
    records = [r for r in records if _numbers(r, "step", "loss", "lr", "tokens_per_s") or _numbers(r, "step", "eval_loss")]
    if not any("loss" in r for r in records):
        sys.stderr.write(f"error: {path}: no training steps recorded yet\n")
        return 2
    out = a.out or a.run_dir / "metrics.png"
    problem = check_out(out, path)
    if problem:
        sys.stderr.write(f"error: --out {out}: {problem}\n")
        return 2
    try:
        plot(records, out)
    except ImportError:
        sys.stderr.write("error: plotting needs matplotlib: pip install matplotlib\n")
        return 2
    except OSError as e:
        sys.stderr.write(f"error: {e.filename or out}: {e.strerror or e}\n")
        return 2
    steps = [r["step"] for r in records if "loss" in r]
    print(f"plotted {len(steps)} logged steps (up to step {max(steps)}) and "
          f"{sum('eval_loss' in r for r in records)} evaluations -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
