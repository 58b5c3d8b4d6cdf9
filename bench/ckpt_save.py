"""Checkpoint size per parameter and the time a save blocks training.

    python bench/ckpt_save.py --model debug|demo|100m|tinyllama [--async on|off] [--saves 3]
                              [--device cpu|cuda] [--precision fp32|bf16] [--keep-last N] [--keep DIR]

GPU (the GPU-runs issue; TinyLlama 1.1B, bf16, ZeRO-1, one H200)::

    bash bench/device.sh python bench/ckpt_save.py --model tinyllama --device cuda --precision bf16 \
        --saves 4 --keep-last 1

Trains the model for ``--saves`` steps on a generated pattern dataset, saving after every step, then
reports: bytes on disk per parameter (total and per top-level entry of the last checkpoint), the
formula's bytes (weights + fp32 masters when they are separate + two AdamW moments), and the blocked
and total seconds of every save (from ``metrics.jsonl``'s checkpoint records). One ``RESULT {json}``
line at the end. On the GPU (``--device cuda``, TinyLlama 1.1B on one H200) it is the GPU-runs
issue's blocked-time-per-save measurement (goal <= 1 s).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("bench.ckpt_save")

# name -> (model overrides, vocabulary, sequence length)
MODELS = {
    "debug": (["model.preset=debug"], 512, 32),
    "demo": (["model.preset=demo"], 4096, 64),
    # ~98M parameters: a GPT-2-small body with an 8k vocabulary (untied).
    "100m": (["model.preset=debug", "model.hidden_size=768", "model.num_layers=12", "model.num_heads=12",
              "model.num_kv_heads=12", "model.ffn_hidden_size=2048", "model.vocab_size=8192",
              "model.max_seq_len=256"], 8192, 32),
    "tinyllama": (["model.preset=tinyllama-1.1b"], 32000, 512),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="debug")
    p.add_argument("--async", dest="async_", choices=("on", "off"), default="on")
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--keep-last", type=int, default=2, help="checkpoint.keep_last (disk: up to this + 1 checkpoints)")
    p.add_argument("--keep", default="", help="keep the run directory here (default: a temporary one)")
    return p.parse_args(argv)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def num_params(cfg) -> int:
    from megatrain.checkpoint.layout import model_layout

    total = 0
    for shape, _ in model_layout(cfg.model).values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def formula_bytes(precision: str) -> int:
    """Bytes per parameter the layout should meet: weights (+ fp32 masters unless fp32) + two fp32 moments."""
    return {"fp32": 4, "bf16": 2, "fp16": 2}[precision] + (0 if precision == "fp32" else 4) + 8


def run(o: argparse.Namespace, root: Path) -> dict:
    from megatrain.config import load_config
    from megatrain.train import main as train_main
    from tests.conftest import build_pattern_dataset

    overrides, vocab, seq = MODELS[o.model]
    data = build_pattern_dataset(str(root / "pattern"), vocab=vocab, docs=64)
    args = [*overrides, "data.split=100,0,0", f"train.seq_len={seq}", "train.global_batch_size=2",
            "train.micro_batch_size=2", f"train.precision={o.precision}", "logging.interval=1", "eval.steps=0",
            "eval.sample_tokens=0", f"train.max_steps={o.saves}", "checkpoint.interval=1",
            f"checkpoint.keep_last={o.keep_last}", f"checkpoint.async_save={'true' if o.async_ == 'on' else 'false'}",
            f"deepspeed.zero_stage={o.zero}", f"data.path={data}", f"run.dir={root / 'run'}",
            "distributed.timeout_s=3600"]
    if o.device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    rc = train_main(args)
    if rc != 0:
        raise SystemExit(f"training exited with {rc}")
    cfg = load_config(None, args)
    n = num_params(cfg)
    ckpts = sorted((root / "run" / "checkpoints").glob("step_*"))
    last = ckpts[-1]
    parts = {p.name: round(du(p) / n, 3) for p in sorted(last.iterdir())}
    saves = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()
             if '"save_blocked_s"' in line]
    return {"model": o.model, "params": n, "precision": o.precision, "zero": o.zero, "async": o.async_,
            "device": o.device, "bytes_per_param": round(du(last) / n, 3), "formula_bytes_per_param":
            formula_bytes(o.precision), "checkpoint_bytes": du(last), "per_entry_bytes_per_param": parts,
            "save_blocked_s": [round(r["save_blocked_s"], 3) for r in saves],
            "save_total_s": [round(r["save_total_s"], 3) for r in saves if r.get("save_total_s") is not None]}


def main(argv=None) -> None:
    o = parse_args(argv)
    root = Path(o.keep) if o.keep else Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        res = run(o, root)
    finally:
        if not o.keep:
            shutil.rmtree(root, ignore_errors=True)
    blocked = res["save_blocked_s"]
    logging.getLogger().info("%s: %.2f bytes/parameter (formula %d); blocked per save %s s, total %s s",
                             o.model, res["bytes_per_param"], res["formula_bytes_per_param"], blocked,
                             res["save_total_s"])
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
