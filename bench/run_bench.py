"""megatrain vs the HF + DeepSpeed + Liger baseline on one GPU, side by side in one command.

Each configuration runs in its own process, one after the other (a fresh CUDA
context and allocator each, so neither side inherits the other's memory), and
prints a RESULT line; this script collects them, prints one table with the
megatrain/baseline ratios (same micro-batch, and best against best per shape),
and writes everything as JSON.

    python bench/run_bench.py --plan final --out $OUT
    python bench/run_bench.py --run hf:tinyllama:16 --run mt:tinyllama:16:compile=1 --out $OUT

A run spec is ``side:shape:micro_batch[:key=value,...]`` with side ``mt``
(bench/megatrain_run.py; keys: kernels, attention, compile, zero, ckpt, chunk,
profile, fp8, fp8_filter) or ``hf`` (bench/baseline_hf_ds.py; keys: liger (default 1), zero,
profile).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHAPES  # noqa: E402

HERE = Path(__file__).resolve().parent
MT = "kernels=auto"  # the engine as configured by default: train.fused_kernels=auto, ZeRO-1, no compile
PLANS = {
    # what docs/benchmarks.md reports: the baseline at the micro-batches where it is best (16/32 and 4/8/16;
    # larger ones do not fit on an H200), megatrain at the same ones
    "final": ["hf:tinyllama:16", "hf:tinyllama:32", f"mt:tinyllama:16:{MT}", f"mt:tinyllama:32:{MT}",
              "hf:llama3.2-1b:4", "hf:llama3.2-1b:8", "hf:llama3.2-1b:16", f"mt:llama3.2-1b:4:{MT}",
              f"mt:llama3.2-1b:8:{MT}", f"mt:llama3.2-1b:16:{MT}"],
    # an 80 GB H100 holds the baseline up to micro-batch 16 (TinyLlama) and 8 (Llama-3.2-1B)
    "h100": ["hf:tinyllama:16", f"mt:tinyllama:16:{MT}", "hf:llama3.2-1b:4", "hf:llama3.2-1b:8",
             f"mt:llama3.2-1b:4:{MT}", f"mt:llama3.2-1b:8:{MT}"],
    "smoke": ["mt:tinyllama:2:kernels=triton", "hf:tinyllama:2"],
    # FP8 (issue 20): the baseline, megatrain bf16 eager and compiled (FP8 compiles, so compiled bf16 is the
    # fair reference), and each FP8 recipe, at the baseline's best TinyLlama micro-batch and at Llama-3.2-1B
    "fp8": ["hf:tinyllama:16", f"mt:tinyllama:16:{MT}", f"mt:tinyllama:16:{MT},compile=1",
            *(f"mt:tinyllama:16:{MT},fp8={r}" for r in ("tensorwise", "rowwise", "rowwise_with_gw_hp")),
            f"mt:llama3.2-1b:8:{MT},compile=1", f"mt:llama3.2-1b:8:{MT},fp8=tensorwise"],
    # the same list at toy size on a CPU: checks the scripts and the table, measures nothing
    "fp8-toy": ["hf:toy:2:liger=0", "mt:toy:2", "mt:toy:2:fp8=tensorwise,fp8_filter=all",
                "mt:toy:2:fp8=rowwise,fp8_filter=all", "mt:toy:2:fp8=rowwise_with_gw_hp,fp8_filter=all"],
}


def command_for(spec: str, steps: int, warmup: int) -> tuple[list[str], dict]:
    parts = spec.split(":")
    if len(parts) < 3 or parts[0] not in ("mt", "hf") or parts[1] not in SHAPES:
        raise SystemExit(f"--run {spec!r}: expected mt|hf:{'|'.join(SHAPES)}:MB[:key=value,...]")
    side, shape, mb = parts[0], parts[1], int(parts[2])
    opts = dict(kv.split("=", 1) for kv in parts[3].split(",") if kv) if len(parts) > 3 else {}
    common = ["--mb", str(mb), "--steps", str(steps), "--warmup", str(warmup)]
    if side == "mt":
        cmd = [sys.executable, str(HERE / "megatrain_run.py"), "--shape", shape, *common]
        for k, v in opts.items():
            cmd += [f"--{k}", v]
    else:
        cmd = [sys.executable, str(HERE / "baseline_hf_ds.py"), *shlex.split(SHAPES[shape][2]), "--shape", shape,
               *common]
        if opts.pop("liger", "1") == "1":
            cmd.append("--liger")
        for k, v in opts.items():
            cmd += [f"--{k}", v]
    return cmd, {"spec": spec, "side": side, "shape": shape, "mb": mb}


def run_one(spec: str, steps: int, warmup: int, timeout: float, log) -> dict:
    cmd, meta = command_for(spec, steps, warmup)
    print(f"=== {spec}  ({' '.join(cmd[1:])})", flush=True)
    log.write(f"\n=== {spec}\n$ {' '.join(cmd)}\n")
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"), 124
    log.write(out)
    log.flush()
    results = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    wall = round(time.time() - t0, 1)
    if not results:
        tail = "\n".join(out.strip().splitlines()[-6:])
        print(f"    FAILED rc={rc} after {wall}s:\n{tail}", flush=True)
        return {**meta, "error": f"rc={rc}", "wall_s": wall}
    for line in out.splitlines():
        if line.startswith("profile"):
            print("    " + line, flush=True)
    r = {**meta, **results[-1], "spec": spec, "wall_s": wall}
    print(f"    {r['tok_s']:,} tok/s  {r['mfu_vs_989']:.1%} MFU  peak {r['peak_mem_GiB']} GiB  ({wall}s)", flush=True)
    return r


def variant(r: dict) -> str:
    if r["side"] == "baseline":
        return "HF+DS ZeRO-%d%s" % (r.get("zero", 2), " +Liger" if r.get("liger") else "")
    bits = [r.get("kernels", "?"), "compile" if r.get("compile") else "eager", f"ZeRO-{r.get('zero')}"]
    if r.get("fp8") not in (None, "off"):
        bits.append(f"FP8 {r['fp8']} ({r.get('fp8_linears')}/{r.get('linears')} linears)")
    if r.get("igu"):
        bits.append("igu")
    if r.get("attention") not in (None, "auto"):
        bits.append(r["attention"])
    if r.get("ckpt") not in (None, "none"):
        bits.append("ckpt=" + r["ckpt"])
    return "megatrain " + " ".join(bits)


def compare(results: list[dict]) -> list[dict]:
    """megatrain/baseline tokens/s: at the same micro-batch, and best against best, per shape."""
    ok = [r for r in results if "tok_s" in r]
    out = []
    for shape in SHAPES:
        mt = [r for r in ok if r["shape"] == shape and r["side"] == "megatrain"]
        hf = [r for r in ok if r["shape"] == shape and r["side"] == "baseline"]
        if not mt or not hf:
            continue
        for mb in sorted({r["mb"] for r in mt} & {r["mb"] for r in hf}):
            a = max((r for r in mt if r["mb"] == mb), key=lambda r: r["tok_s"])
            b = max((r for r in hf if r["mb"] == mb), key=lambda r: r["tok_s"])
            out.append({"shape": shape, "what": f"same micro-batch {mb}", "megatrain": a["spec"], "baseline": b["spec"],
                        "ratio": round(a["tok_s"] / b["tok_s"], 3), "megatrain_mfu": a["mfu_vs_989"]})
        out += _fp8_vs_bf16(shape, mt)
        a, b = max(mt, key=lambda r: r["tok_s"]), max(hf, key=lambda r: r["tok_s"])
        out.append({"shape": shape, "what": "best vs best", "megatrain": a["spec"], "baseline": b["spec"],
                    "ratio": round(a["tok_s"] / b["tok_s"], 3), "megatrain_mfu": a["mfu_vs_989"]})
    return out


def _fp8_vs_bf16(shape: str, mt: list[dict]) -> list[dict]:
    """Each FP8 run against the fastest bf16 megatrain run at its micro-batch (compiled if any was)."""
    out = []
    for r in (r for r in mt if r.get("fp8") not in (None, "off")):
        bf16 = [b for b in mt if b.get("fp8") in (None, "off") and b["mb"] == r["mb"]]
        if bf16:
            b = max(bf16, key=lambda x: x["tok_s"])
            out.append({"shape": shape, "what": f"FP8 {r['fp8']} vs bf16, micro-batch {r['mb']}", "megatrain": r["spec"],
                        "baseline": b["spec"], "ratio": round(r["tok_s"] / b["tok_s"], 3),
                        "megatrain_mfu": r["mfu_vs_989"]})
    return out


def table(results: list[dict], comparisons: list[dict]) -> str:
    rows = ["| shape | configuration | mb | tokens/s | TFLOP/s | MFU | peak GiB (est.) | step s median (spread) |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "tok_s" not in r:
            rows.append(f"| {r['shape']} | {r['spec']} | {r['mb']} | failed ({r.get('error')}) | | | | |")
            continue
        est = f" ({r['est_mem_GiB']})" if r.get("est_mem_GiB") else ""
        rows.append(f"| {r['shape']} | {variant(r)} | {r['mb']} | {r['tok_s']:,} | {r['tflops']} | "
                    f"{r['mfu_vs_989']:.1%} | {r['peak_mem_GiB']}{est} | {r['step_s_median']} ({r['spread_pct']}%) |")
    rows += ["", "| shape | comparison | megatrain | baseline | ratio | megatrain MFU |", "|---|---|---|---|---|---|"]
    for c in comparisons:
        rows.append(f"| {c['shape']} | {c['what']} | {c['megatrain']} | {c['baseline']} | {c['ratio']:.3f}x | "
                    f"{c['megatrain_mfu']:.1%} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", choices=sorted(PLANS), help="a named list of runs")
    p.add_argument("--run", action="append", default=[], help="a run spec (repeatable; after --plan's)")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=540, help="skip runs that would start after this many seconds")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    a = p.parse_args(argv)
    specs = (PLANS[a.plan] if a.plan else []) + a.run
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, results = time.time(), []
    with open(out / "bench.log", "a") as log:
        for spec in specs:
            left = a.budget_s - (time.time() - t0)
            if left < 45:
                print(f"=== {spec}: skipped, {left:.0f}s of the budget left", flush=True)
                results.append({**command_for(spec, a.steps, a.warmup)[1], "error": "skipped (budget)"})
                continue
            results.append(run_one(spec, a.steps, a.warmup, left, log))
    comparisons = compare(results)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "gpu": next((r["gpu"] for r in results if "gpu" in r), "?"), "argv": sys.argv,
              "steps": a.steps, "warmup": a.warmup, "results": results, "comparisons": comparisons}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out / "results.json")
    print("\n" + table(results, comparisons))
    print(f"\n{len(results)} runs, {sum('tok_s' in r for r in results)} ok, {time.time() - t0:.0f}s; "
          f"GPU {report['gpu']}; JSON in {out / 'results.json'}")


if __name__ == "__main__":
    main()
