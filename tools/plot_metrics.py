#!/usr/bin/env python3
"""Plot a run's metrics.jsonl: loss and eval loss, learning rate, throughput -> RUN_DIR/metrics.png.

    python tools/plot_metrics.py RUN_DIR [--out FILE.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.telemetry.console import pipe_safe  # noqa: E402


def load_records(path: Path) -> list[dict]:
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # the last line of a run killed mid-write may be cut; anything else is worth knowing about
            sys.stderr.write(f"{path}:{n}: not JSON, skipped\n")
    return records


def plot(records: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
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
    if not any("loss" in r for r in records):
        sys.stderr.write(f"error: {path}: no training steps recorded yet\n")
        return 2
    out = a.out or a.run_dir / "metrics.png"
    plot(records, out)
    steps = [r["step"] for r in records if "loss" in r]
    print(f"plotted {len(steps)} logged steps (up to step {max(steps)}) and "
          f"{sum('eval_loss' in r for r in records)} evaluations -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
