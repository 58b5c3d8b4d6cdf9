"""FP8 vs bf16 loss parity on real text: the same model, data order and schedule trained once in bf16 and
once per FP8 recipe through megatrain's own Trainer; prints the per-step loss gap and writes the curves.

    python bench/fp8_parity.py --steps 300 --out $OUT                        # GPU: ~100M model, demo text
    python bench/fp8_parity.py --steps 300 --data PREFIX --tokenizer TOK.model --preset tinyllama-1.1b
    python bench/fp8_parity.py --toy --steps 6 --out /tmp/parity             # CPU: checks the script only

The text is the built-in demo corpus (Python's own documentation, megatrain.data.demo) unless --data
names a Megatron prefix. ``train.fp8_filter=all`` by default: the question here is the numerics of
FP8 in every block GEMM, not which GEMMs are large enough to pay. The gap is reported as the largest
and the mean relative difference of the loss over all steps and over the last fifth (where noise from
the early fast fall no longer dominates).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import device, gpu_name, single_process_env  # noqa: E402

log = logging.getLogger("bench.fp8_parity")
RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
# ~110M parameters with the demo corpus' 4096-token vocabulary: every block GEMM is >= 1024 wide
GPU_MODEL = ["model.hidden_size=1024", "model.num_layers=8", "model.num_heads=16", "model.num_kv_heads=4",
             "model.ffn_hidden_size=2816", "model.vocab_size=4096", "model.max_seq_len=1024"]
TOY_MODEL = ["model.preset=debug", "model.vocab_size=4096"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--preset", help="model.preset instead of the built-in ~110M shape")
    p.add_argument("--data", help="Megatron dataset prefix (default: the demo corpus)")
    p.add_argument("--tokenizer", help="sentencepiece model of --data")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--mb", type=int, default=8)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--fp8_filter", default="all")
    p.add_argument("--toy", action="store_true", help="debug model, seq 64, micro-batch 2 (CPU check)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--work", default="/tmp/fp8_parity", help="run directories (checkpoints off)")
    return p.parse_args(argv)


def overrides(a: argparse.Namespace, name: str, fp8: str) -> list[str]:
    model = TOY_MODEL if a.toy else ([f"model.preset={a.preset}"] if a.preset else GPU_MODEL)
    seq, mb = (64, 2) if a.toy else (a.seq, a.mb)
    data = [f"data.path={a.data}"] + ([f"data.tokenizer={a.tokenizer}"] if a.tokenizer else []) if a.data else []
    return model + data + [
        "data.split=98,2,0", f"run.dir={a.work}/{name}", f"train.max_steps={a.steps}", f"train.seq_len={seq}",
        f"train.micro_batch_size={mb}", "train.precision=bf16", "train.resume=never", f"train.fp8={fp8}",
        f"train.fp8_filter={a.fp8_filter}", "logging.interval=1", "eval.steps=0", "eval.sample_tokens=0",
        "checkpoint.save_at_end=false", f"optimizer.lr={a.lr}", f"optimizer.min_lr={a.lr / 10}",
        f"schedule.warmup_steps={max(1, a.steps // 20)}"]


def train_curve(a: argparse.Namespace, name: str, fp8: str) -> tuple[dict[int, float], float]:
    from megatrain.config import load_config
    from megatrain.parallel.state import ParallelState
    from megatrain.train import torch_seed, train_with

    cfg = load_config(None, overrides(a, name, fp8))
    torch_seed(cfg.train.seed)
    t0 = time.time()
    tr = train_with(cfg, ParallelState.build(1, 1), device())
    return {r["step"]: r["loss"] for r in tr.history if "loss" in r}, time.time() - t0


def gap(curve: dict[int, float], ref: dict[int, float]) -> dict:
    rel = [abs(curve[s] - ref[s]) / abs(ref[s]) for s in sorted(ref)]
    tail = rel[-max(1, len(rel) // 5):]
    return {"max_rel": round(max(rel), 5), "mean_rel": round(statistics.mean(rel), 5),
            "tail_max_rel": round(max(tail), 5), "tail_mean_rel": round(statistics.mean(tail), 5),
            "final": round(curve[max(curve)], 4), "final_ref": round(ref[max(ref)], 4)}


def main(argv=None) -> None:
    import deepspeed

    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    single_process_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    curves, secs = {}, {}
    for fp8 in ["off", *[r for r in a.recipes.split(",") if r]]:
        name = "bf16" if fp8 == "off" else fp8
        curves[name], secs[name] = train_curve(a, name, fp8)
        log.info("%s: %d steps in %.0fs, loss %.4f -> %.4f", name, len(curves[name]), secs[name],
                 curves[name][min(curves[name])], curves[name][max(curves[name])])
    ref = curves["bf16"]
    gaps = {name: gap(c, ref) for name, c in curves.items() if name != "bf16"}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"gpu": gpu_name(), "torch": torch.__version__, "argv": sys.argv, "steps": a.steps,
              "overrides": overrides(a, "NAME", "RECIPE"), "seconds": secs, "gaps": gaps,
              "curves": {k: [v[s] for s in sorted(v)] for k, v in curves.items()}}
    (out / "fp8_parity.json").write_text(json.dumps(report, indent=1))
    rows = ["| recipe | max rel. gap | mean | last-fifth max | last-fifth mean | final loss (bf16) |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {n} | {g['max_rel']:.2%} | {g['mean_rel']:.2%} | {g['tail_max_rel']:.2%} | {g['tail_mean_rel']:.2%} "
             f"| {g['final']} ({g['final_ref']}) |" for n, g in gaps.items()]
    print("\n".join(rows))
    worst = max((g["tail_mean_rel"] for g in gaps.values()), default=0.0)
    print(f"\n{len(curves)} runs x {a.steps} steps on {report['gpu']}; worst last-fifth mean gap {worst:.2%}; "
          f"JSON in {out / 'fp8_parity.json'}")


if __name__ == "__main__":
    main()
