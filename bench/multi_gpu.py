"""Several GPUs over NCCL: loss-curve agreement across layouts, resume across GPU counts, scaling.

One command on a 4-GPU machine (see docs/benchmarks.md for the exact call):

    python bench/multi_gpu.py --out $OUT [--only curves,resume,scaling] [--steps 50]

Every run is ``torchrun --nproc_per_node N -m megatrain.train ...`` on a synthetic, learnable
dataset written first (no network on the device). Results: one JSON file and a printed table.
On a CPU machine, ``--cpu-smoke`` runs the same plan with the debug preset over gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# ~350M parameters: hidden 1024, 24 layers, 16 heads / 8 KV heads, FFN 2816, vocab 32000.
MODEL_350M = ["model.hidden_size=1024", "model.num_layers=24", "model.num_heads=16", "model.num_kv_heads=8",
              "model.ffn_hidden_size=2816", "model.vocab_size=32000", "model.max_seq_len=2048"]
DEBUG = ["model.preset=debug"]

# (name, GPUs, overrides): the same global batch (--curve-batch) x seq 1024 in every layout; accumulation
# makes up the rest. The two extra 1-GPU runs are the noise floor: the same run again (kernel
# nondeterminism) and the same batch cut into smaller micro-batches (another bf16 summation order, no
# parallelism at all). A layout is as close to 1 GPU as those two are to each other, or it has a problem.
LAYOUTS = [
    ("1gpu", 1, ["train.micro_batch_size=8"]),
    ("1gpu_repeat", 1, ["train.micro_batch_size=8"]),
    ("1gpu_mb4", 1, ["train.micro_batch_size=4"]),
    ("dp4_zero1", 4, ["train.micro_batch_size=8", "deepspeed.zero_stage=1"]),
    ("dp4_zero2", 4, ["train.micro_batch_size=8", "deepspeed.zero_stage=2"]),
    ("dp4_zero3", 4, ["train.micro_batch_size=8", "deepspeed.zero_stage=3"]),
    ("tp2_dp2", 4, ["train.micro_batch_size=8", "parallel.tensor=2"]),
    ("pp2_dp2", 4, ["train.micro_batch_size=8", "parallel.pipeline=2"]),
    ("tp2_pp2", 4, ["train.micro_batch_size=8", "parallel.tensor=2", "parallel.pipeline=2",
                    "checkpoint.save_at_end=true"]),  # its checkpoint feeds the conversion check
]

# Big models on 4 GPUs (name, GPUs, overrides); tokens/s and MFU from the logged intervals after warm-up.
LLAMA3_8B = ["model.preset=llama3-8b", "train.seq_len=4096"]
LLAMA2_13B = ["model.preset=llama2-13b", "train.seq_len=4096"]
BIG = [
    ("llama3_8b_zero3_dp4", 4, LLAMA3_8B + ["deepspeed.zero_stage=3", "train.micro_batch_size=4",
                                            "train.global_batch_size=16"]),
    ("llama3_8b_tp2_dp2", 4, LLAMA3_8B + ["parallel.tensor=2", "deepspeed.zero_stage=1",
                                          "train.micro_batch_size=4", "train.global_batch_size=8"]),
    ("llama2_13b_tp2_pp2", 4, LLAMA2_13B + ["parallel.tensor=2", "parallel.pipeline=2", "deepspeed.zero_stage=1",
                                            "train.micro_batch_size=2", "train.global_batch_size=32",
                                            "logging.pipeline_timing=true"]),
]
# One GPU, ZeRO-3 with parameters and optimizer state in host memory, growing shapes until one fails (about
# 18 bytes per parameter of host memory: fp32 master, Adam moments, fp32 gradients, bf16 weights).
OFFLOAD = [  # (name, micro-batch of seq 2048, overrides)
    ("llama2_13b_offload", 4, ["model.preset=llama2-13b"]),
    ("llama_20b_offload", 2, ["model.preset=llama2-13b", "model.hidden_size=6144", "model.num_layers=52",
                              "model.num_heads=48", "model.num_kv_heads=8", "model.ffn_hidden_size=16384"]),
]


def write_dataset(prefix: str, vocab: int, tokens: int, seed: int = 0) -> None:
    """Documents made of recurring "phrases" (fixed token runs) with Zipf-distributed tokens and phrase
    frequencies: unigram and phrase statistics are learnable from the first steps, so the loss falls
    smoothly instead of hovering at ln(vocab), where step-to-step noise would swamp a layout comparison."""
    from megatrain.data.indexed import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    zipf_tokens = np.minimum(rng.zipf(1.2, size=20_000 * 8), vocab) - 1
    phrases = [zipf_tokens[i * 8: i * 8 + int(rng.integers(3, 9))] for i in range(20_000)]
    written = 0
    with IndexedDatasetBuilder(prefix, vocab) as b:
        while written < tokens:
            picks = np.minimum(rng.zipf(1.3, size=int(rng.integers(50, 400))), len(phrases)) - 1
            doc = np.concatenate([phrases[i] for i in picks])
            b.add_sequence(doc)
            b.end_document()
            written += len(doc)
        b.finalize(eod_id=0)


DEADLINE = [float("inf")]  # time.time() after which no new run starts (--budget-s)


def torchrun(n: int, overrides: list[str], log: Path, env: dict, timeout: int = 600, port: int = 0) -> dict:
    if time.time() > DEADLINE[0]:
        return {"exit": None, "skipped": "time budget of this command spent"}
    timeout = int(max(30, min(timeout, DEADLINE[0] + 60 - time.time())))
    port = port or 29500 + (hash(str(log)) % 1000)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_port", str(port),
           "-m", "megatrain.train", *overrides]
    t0 = time.time()
    with open(log, "w") as f:
        try:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"exit": None, "timed_out_s": timeout, "cmd": " ".join(cmd[1:])}
    return {"exit": p.returncode, "wall_s": round(time.time() - t0, 1), "cmd": " ".join(cmd[1:])}


def losses(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r] if path.is_file() else []


def max_rel(a: list[float], b: list[float]) -> float:
    if not a or len(a) != len(b):
        return float("inf")
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def common(data: str, run: Path, steps: int, interval: int) -> list[str]:
    """What every run here shares: the data, a fresh run directory, no evaluation, samples or final save."""
    return [f"data.path={data}", "data.split=100,0,0", f"run.dir={run}", f"train.max_steps={steps}",
            "train.resume=never", f"logging.interval={interval}", "eval.steps=0", "eval.sample_tokens=0",
            "checkpoint.save_at_end=false"]


def base(args, data: str, run: Path, steps: int) -> list[str]:
    """The curve runs' model and schedule (the debug model in fp32 with --cpu-smoke)."""
    model = DEBUG if args.cpu_smoke else MODEL_350M
    return model + common(data, run, steps, 1) + [
        f"train.seq_len={128 if args.cpu_smoke else 1024}", f"train.global_batch_size={args.curve_batch}",
        f"optimizer.lr={args.curve_lr}", "schedule.warmup_steps=10",
        f"train.precision={'fp32' if args.cpu_smoke else 'bf16'}"]


def run_curves(args, data: str, out: Path, env: dict) -> dict:
    """Every layout of LAYOUTS on the same data; the 1-GPU runs side by side, one per GPU (they share nothing)."""
    res = {}

    def one(name: str, n: int, extra: list[str], run_env: dict, port: int = 0) -> None:
        run = out / "runs" / name
        res[name] = torchrun(n, base(args, data, run, args.steps) + extra + args.curve_extra, out / f"{name}.log",
                             run_env, port=port)
        res[name]["losses"] = losses(run)

    singles = [(name, extra) for name, n, extra in LAYOUTS if n == 1]
    slots = max(1, min(args.max_gpus, len(singles)))
    for first in range(0, len(singles), slots):  # a wave of up to one run per GPU
        wave = [threading.Thread(target=one, args=(name, 1, extra, dict(env, CUDA_VISIBLE_DEVICES=str(i)),
                                                   29400 + i))
                for i, (name, extra) in enumerate(singles[first:first + slots])]
        for t in wave:
            t.start()
        for t in wave:
            t.join()
    for name, n, extra in LAYOUTS:
        if 1 < n <= args.max_gpus:
            one(name, n, extra, env)
    ref = res.get("1gpu", {}).get("losses", [])
    for name in res:
        got = res[name]["losses"]
        res[name]["max_rel_diff_vs_1gpu"] = max_rel(got, ref)
        if got and len(got) == len(ref):  # by thirds of the run: early agreement, then any drift
            k = len(ref)
            res[name]["max_rel_diff_by_third"] = [max_rel(got[a:b], ref[a:b]) for a, b in
                                                  ((0, k // 3), (k // 3, 2 * k // 3), (2 * k // 3, k))]
    return res


def _speed(run: Path, r: dict, skip: int = 2) -> dict:
    """Median tokens/s, TFLOP/s per GPU and MFU of the logged intervals after ``skip`` warm-up ones."""
    recs = records(run)[skip:] if r.get("exit") == 0 else []
    for key in ("tokens_per_s", "tflops", "mfu", "mem_gib"):
        vals = [x[key] for x in recs if x.get(key) is not None]
        r[key] = None if not vals else max(vals) if key == "mem_gib" else float(np.median(vals))
    pipe = [x for x in recs if "pipe_bubble" in x]
    if pipe:
        for key in ("pipe_bubble", "pipe_bubble_step", "pipe_compute_ms", "pipe_update_ms", "pipe_step_ms",
                    "pipe_p2p_ms"):
            r[key] = np.median([x[key] for x in pipe], axis=0).round(4).tolist()
        r["pipe_bubble_theory"] = pipe[0]["pipe_bubble_theory"]
    return r


def run_big(args, data: str, out: Path, env: dict) -> dict:
    """Llama-3 8B (seq 4096) as ZeRO-3 DP=4 and TP=2 x DP=2; Llama-2 13B as TP=2 x PP=2 with the bubble."""
    res = {}
    data_l3 = data + "_v128k"  # Llama-3's 128K vocabulary needs uint32 tokens: its own copy of the data
    if not args.cpu_smoke and not Path(data_l3 + ".idx").is_file():
        write_dataset(data_l3, 128256, 2_000_000)
    for name, n, extra in BIG:
        if args.big_names and name not in args.big_names.split(","):
            continue
        run = out / "runs" / name
        if args.cpu_smoke:  # the same layouts on the debug model
            extra = DEBUG + [x for x in extra if not x.startswith(("model.", "train.seq_len", "train.micro",
                                                                     "train.global"))] + [
                "train.seq_len=128", "train.micro_batch_size=2", "train.global_batch_size=16"]
        elif "model.preset=llama3-8b" in extra:
            extra = extra + [f"data.path={data_l3}"]
        over = common(data, run, args.big_steps, 2) + ["train.precision=bf16"] + extra
        res[name] = _speed(run, torchrun(n, over, out / f"{name}.log", env))
    return res


def run_offload(args, data: str, out: Path, env: dict) -> dict:
    """The largest shapes that train on one GPU with ZeRO-3 and CPU offload of parameters and optimizer."""
    res = {}
    for name, mb, extra in OFFLOAD:
        if args.offload_names and name not in args.offload_names.split(","):
            continue
        run = out / "runs" / name
        offload = ["deepspeed.zero_stage=3", "deepspeed.offload=all", f"train.micro_batch_size={mb}",
                   f"train.global_batch_size={mb}"]
        over = common(data, run, args.offload_steps, 1) + ["train.precision=bf16"] + extra + offload + [
            "train.seq_len=2048"]
        if args.cpu_smoke:
            over = common(data, run, 3, 1) + DEBUG + offload + ["train.seq_len=128", "train.precision=fp32"]
        r = _speed(run, torchrun(1, over, out / f"{name}.log", env, timeout=420), skip=1)
        res[name] = r
        if r.get("exit") != 0:
            break  # a larger shape will not fit either
    return res


def run_convert(args, data: str, out: Path, env: dict) -> dict:
    """The TP=2 x PP=2 curve run's final checkpoint -> Hugging Face (megatrain-convert, verified on the CPU),
    then both models on the GPU: megatrain's (loaded from the checkpoint) against transformers' (loaded from
    the export), fp32 and bf16 logits."""
    ckpt = out / "runs" / "tp2_pp2" / "checkpoints"
    hf = out / "hf_tp2_pp2"
    t0 = time.time()
    cmd = [sys.executable, "-m", "megatrain.convert.cli", str(ckpt), str(hf), "--to", "hf", "--overwrite",
           "--no-tokenizer", "--verify-tokens", "8"]
    with open(out / "convert.log", "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=600)
    res = {"cmd": " ".join(cmd[1:]), "exit": p.returncode, "wall_s": round(time.time() - t0, 1),
           "convert_output": (out / "convert.log").read_text()[-600:]}
    if p.returncode == 0:
        chk = subprocess.run([sys.executable, str(ROOT / "bench" / "convert_check.py"), str(ckpt), str(hf)],
                             capture_output=True, text=True, env=env, timeout=600)
        res["gpu_check_exit"] = chk.returncode
        res["gpu_check"] = json.loads(chk.stdout.splitlines()[-1]) if chk.returncode == 0 else chk.stderr[-2000:]
    return res


def run_resume(args, data: str, out: Path, env: dict) -> dict:
    """Save at DP=4 ZeRO-3 mid-run; resume on 2 GPUs and on 1 GPU; compare with the uninterrupted curve."""
    half = args.steps // 2
    full = out / "runs" / "resume_src"
    common = ["train.micro_batch_size=4", "deepspeed.zero_stage=3"]
    res = {"src": torchrun(4, base(args, data, full, args.steps) + common +
                           [f"checkpoint.interval={half}", "checkpoint.keep_last=0"], out / "resume_src.log", env)}
    ref = losses(full)
    src_ckpt = full / "checkpoints" / f"step_{half:08d}"
    for n in (2, 1):
        run = out / "runs" / f"resume_{n}gpu"
        r = torchrun(n, base(args, data, run, args.steps) + common +
                     [f"train.resume={src_ckpt}"], out / f"resume_{n}.log", env)
        got = losses(run)
        r["losses"] = got
        r["max_rel_diff_vs_uninterrupted"] = max_rel(got, ref[half:]) if got else float("inf")
        res[f"{n}gpu"] = r
    res["uninterrupted_tail"] = ref[half:]
    return res


def run_scaling(args, data: str, out: Path, env: dict) -> dict:
    res = {}
    for n in (1, 2, 4):
        run = out / "runs" / f"scale_{n}"
        over = ["model.preset=tinyllama-1.1b"] + common(data, run, 14, 2) + [
            "train.seq_len=2048", "train.micro_batch_size=8", f"train.global_batch_size={8 * n}",
            "deepspeed.zero_stage=1", "train.precision=bf16"] + [f"train.{kv}" for kv in args.mt_train]
        if args.cpu_smoke:
            over = base(args, data, run, 6) + ["train.micro_batch_size=2", f"train.global_batch_size={2 * n}"]
        r = _speed(run, torchrun(n, over, out / f"scale_{n}.log", env))  # drops the two warm-up intervals
        r["tokens_per_s_per_gpu"] = r["tokens_per_s"] / n if r["tokens_per_s"] else None
        res[n] = r
    one = res[1]["tokens_per_s_per_gpu"]
    for n in res:
        if one and res[n]["tokens_per_s_per_gpu"]:
            res[n]["scaling_efficiency"] = res[n]["tokens_per_s_per_gpu"] / one
    return res


def run_3d(args, data: str, out: Path, env: dict) -> dict:
    """TP=2 x PP=2 x DP=2 on 8 ranks against 1 rank; its mid-run checkpoint resumed on 4 ranks as TP=2 x DP=2."""
    half = args.steps // 2
    common = ["train.micro_batch_size=2", "deepspeed.zero_stage=1"]
    ref_run, run3d = out / "runs" / "3d_ref", out / "runs" / "3d_tp2pp2dp2"
    res = {"1rank": torchrun(1, base(args, data, ref_run, args.steps) + common, out / "3d_ref.log", env),
           "tp2_pp2_dp2": torchrun(8, base(args, data, run3d, args.steps) + common +
                                   ["parallel.tensor=2", "parallel.pipeline=2", f"checkpoint.interval={half}",
                                    "checkpoint.keep_last=0"], out / "3d_tp2pp2dp2.log", env)}
    ref = losses(ref_run)
    res["tp2_pp2_dp2"]["losses"] = losses(run3d)
    res["tp2_pp2_dp2"]["max_rel_diff_vs_1rank"] = max_rel(losses(run3d), ref)
    run4 = out / "runs" / "3d_resume_tp2dp2"
    res["resume_on_4_tp2_dp2"] = torchrun(4, base(args, data, run4, args.steps) + common + [
        "parallel.tensor=2", f"train.resume={run3d}/checkpoints/step_{half:08d}"], out / "3d_resume.log", env)
    got = losses(run4)
    res["resume_on_4_tp2_dp2"]["losses"] = got
    res["resume_on_4_tp2_dp2"]["max_rel_diff_vs_uninterrupted_8rank"] = max_rel(got, losses(run3d)[half:])
    res["resume_on_4_tp2_dp2"]["max_rel_diff_vs_1rank"] = max_rel(got, ref[half:])
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "multi_gpu_out")),
                   help="where multi_gpu.json and logs.txt go")
    p.add_argument("--work", type=Path, default=Path("/tmp/megatrain_multi_gpu"),
                   help="scratch: dataset, run directories, per-run logs")
    p.add_argument("--only", default="curves,resume,scaling",
                   help="any of curves,convert,resume,scaling,big,offload,3d (3d: 8 ranks; convert: after curves)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--curve-batch", type=int, default=64, help="global batch (sequences of 1024) of the curves")
    p.add_argument("--curve-lr", type=float, default=5e-5, help="peak learning rate of the curves")
    p.add_argument("--curve-extra", nargs="*", default=[],
                   help="overrides added to every curve run, e.g. train.deterministic=true")
    p.add_argument("--big-steps", type=int, default=10, help="steps of each big-model run")
    p.add_argument("--big-names", default="", help="only these big-model runs (comma-separated names)")
    p.add_argument("--offload-steps", type=int, default=4, help="steps of each offload run")
    p.add_argument("--offload-names", default="", help="only these offload runs (comma-separated names)")
    p.add_argument("--max-gpus", type=int, default=4)
    p.add_argument("--cpu-smoke", action="store_true", help="debug preset over gloo on CPU")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no run after this many seconds")
    p.add_argument("--tokens", type=int, default=5_000_000, help="tokens in the synthetic dataset")
    p.add_argument("--mt-train", nargs="*", default=[], help="extra train.* overrides for the scaling runs")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    DEADLINE[0] = time.time() + args.budget_s
    data = str(args.work / "data" / "synthetic")
    write_dataset(data, 512 if args.cpu_smoke else 32000, args.tokens)
    result = {"date": time.strftime("%Y-%m-%d"), "device": _device()}
    parts = (("curves", run_curves), ("convert", run_convert), ("resume", run_resume), ("scaling", run_scaling),
             ("big", run_big), ("offload", run_offload), ("3d", run_3d))
    for part, fn in parts:
        if part in args.only.split(","):
            t0 = time.time()
            result[part] = fn(args, data, args.work, env)
            result[part + "_wall_s"] = round(time.time() - t0, 1)
            (args.out / "multi_gpu.json").write_text(json.dumps(result, indent=1))
            print(part, json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "losses"} if isinstance(v, dict)
                                     else v for k, v in result[part].items()}, indent=1), flush=True)
            _digest_logs(args.work, args.out / "logs.txt")
    return 0


def _digest_logs(work: Path, dest: Path) -> None:
    """The last lines of every run's log in one file (the device returns only a few files)."""
    with open(dest, "w") as out:
        for log in sorted(work.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()
            out.write(f"===== {log.name} ({len(lines)} lines)\n" + "\n".join(lines[-15:]) + "\n")


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    except Exception:  # noqa: BLE001
        pass
    return "cpu"


if __name__ == "__main__":
    sys.exit(main())
