"""Splitting the sequence on 4 GPUs: sequence parallelism inside TP, and Ulysses context parallelism.

Two parts (see docs/benchmarks.md for the exact calls):

- ``sp``: Llama-2 13B at seq 4096 on TP=4, with and without ``parallel.sequence_parallel``: peak memory
  per GPU, tokens/s and MFU of each, and the memory SP saves.
- ``cp``: Llama-3 8B (the 128K-context preset) with ``parallel.context=4``, ZeRO-3 over the 4 context
  ranks and full recomputation, at growing sequence lengths until one fails: tokens/s, memory, and
  the longest sequence that trains. Every run also prints the dry run's estimate next to the measured
  peak.

    python bench/seq_split.py --out $OUT [--only sp,cp] [--steps 8] [--lengths 32768,65536,131072]

Every run is ``torchrun --nproc_per_node 4 -m megatrain.train ...`` on the synthetic dataset of
bench/multi_gpu.py. ``--cpu-smoke`` runs the same plan on the debug model over gloo (4 CPU processes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import multi_gpu as mg  # noqa: E402  (the harness: dataset, torchrun, speed digest)

LLAMA2_13B = ["model.preset=llama2-13b", "train.seq_len=4096", "train.micro_batch_size=1",
              "train.global_batch_size=8", "deepspeed.zero_stage=1"]
LLAMA3_8B_LONG = ["model.preset=llama3.1-8b", "train.micro_batch_size=1", "train.global_batch_size=1",
                  "deepspeed.zero_stage=3", "train.activation_checkpointing=full"]
DEBUG_SP = ["model.preset=debug", "model.num_kv_heads=4", "train.seq_len=128", "train.micro_batch_size=2",
            "train.global_batch_size=4", "deepspeed.zero_stage=1"]
DEBUG_CP = ["model.preset=debug", "train.micro_batch_size=1", "train.global_batch_size=1", "deepspeed.zero_stage=3",
            "train.activation_checkpointing=full"]


def _estimate(overrides: list[str], world: int) -> float:
    """The dry run's memory estimate (GiB per GPU) for these overrides."""
    from megatrain.config import load_config
    from megatrain.data.batch import plan_batch
    from megatrain.model.accounting import estimate_memory

    cfg = load_config(None, overrides)
    p, t = cfg.parallel, cfg.train
    dp = world // (p.tensor * p.pipeline * p.context)
    plan = plan_batch(t, dp)
    est = estimate_memory(cfg.model, seq_len=t.seq_len, micro_batch=plan.micro_batch, tp=p.tensor, pp=p.pipeline,
                          dp=dp, zero_stage=cfg.deepspeed.zero_stage, offload=cfg.deepspeed.offload,
                          precision="fp32" if t.precision == "fp32" else "bf16",
                          checkpointing=t.activation_checkpointing, sequence_parallel=p.sequence_parallel,
                          cp=p.context)
    return round(est["total"] / 2**30, 3)


def _run(name: str, over: list[str], out: Path, env: dict, timeout: int) -> dict:
    run = out / "runs" / name  # mg.common put run.dir there
    r = mg._speed(run, mg.torchrun(4, over, out / f"{name}.log", env, timeout=timeout), skip=1)
    r["estimate_gib"] = _estimate([x for x in over if not x.startswith(("data.", "run."))], 4)
    return r


def run_sp(args, data: str, out: Path, env: dict) -> dict:
    """TP=4 with and without sequence parallelism: the memory SP saves and what it costs in speed."""
    shape = DEBUG_SP + ["train.precision=fp32"] if args.cpu_smoke else LLAMA2_13B + ["train.precision=bf16"]
    res = {}
    for name, sp in (("tp4", "false"), ("tp4_sp", "true")):
        over = shape + mg.common(data, out / "runs" / name, args.steps, 1) + [
            "parallel.tensor=4", f"parallel.sequence_parallel={sp}"]
        res[name] = _run(name, over, out, env, args.timeout)
    a, b = res["tp4"].get("mem_gib"), res["tp4_sp"].get("mem_gib")
    res["memory_saved_gib"] = round(a - b, 2) if a and b else None
    ta, tb = res["tp4"].get("tokens_per_s"), res["tp4_sp"].get("tokens_per_s")
    res["speed_ratio_sp_over_tp"] = round(tb / ta, 3) if ta and tb else None
    return res


def run_cp(args, data: str, out: Path, env: dict) -> dict:
    """CP=4 at growing sequence lengths; stops at the first length that does not train."""
    res = {}
    for seq in args.lengths:
        name = f"cp4_seq{seq}"
        shape = DEBUG_CP + ["train.precision=fp32"] if args.cpu_smoke else LLAMA3_8B_LONG + [
            "train.precision=bf16", f"data.path={data}_v128k"]
        over = mg.common(data, out / "runs" / name, args.steps, 1) + shape + [
            f"train.seq_len={seq}", "parallel.context=4"]
        r = res[name] = _run(name, over, out, env, args.timeout)
        if r.get("exit") != 0:
            break
        res["longest_trained"] = seq
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "seq_split_out")))
    p.add_argument("--work", type=Path, default=Path("/tmp/megatrain_seq_split"))
    p.add_argument("--only", default="sp,cp", help="any of sp,cp")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lengths", default="32768,65536,131072", help="cp: sequence lengths to try, in order")
    p.add_argument("--timeout", type=int, default=420, help="seconds per run")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no run after this many seconds")
    p.add_argument("--cpu-smoke", action="store_true", help="the debug model over gloo on 4 CPU processes")
    args = p.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")] if not args.cpu_smoke else [128, 256]
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    mg.DEADLINE[0] = time.time() + args.budget_s
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    data = str(args.work / "data" / "synthetic")
    vocab = 512 if args.cpu_smoke else 32000
    if not Path(data + ".idx").is_file():
        mg.write_dataset(data, vocab, 400_000 if args.cpu_smoke else 2_000_000)
    if not args.cpu_smoke and "cp" in args.only and not Path(data + "_v128k.idx").is_file():
        mg.write_dataset(data + "_v128k", 128256, 2_000_000)  # Llama-3's vocabulary: uint32 tokens
    result = {"date": time.strftime("%Y-%m-%d"), "device": mg._device()}
    for part, fn in (("sp", run_sp), ("cp", run_cp)):
        if part in args.only.split(","):
            t0 = time.time()
            result[part] = fn(args, data, args.work, env)
            result[part + "_wall_s"] = round(time.time() - t0, 1)
            (args.out / "seq_split.json").write_text(json.dumps(result, indent=1))
            print(part, json.dumps(result[part], indent=1), flush=True)
            mg._digest_logs(args.work, args.out / "logs.txt")
    runs = [v for part in ("sp", "cp") for v in result.get(part, {}).values() if isinstance(v, dict)]
    ok = sum(r.get("exit") == 0 for r in runs)
    print(f"seq_split: {ok}/{len(runs)} runs trained; results in {args.out / 'seq_split.json'}", flush=True)
    return 0 if ok == len(runs) or "cp" in args.only else 1


if __name__ == "__main__":
    sys.exit(main())
