"""One megatrain training configuration on one GPU: build through megatrain.engine, time the steps.

Same measurement as bench/baseline_hf_ds.py: random tokens generated on the GPU,
AdamW (lr 3e-4, betas 0.9/0.95, weight decay 0.1), clipping 1.0, bf16, one
micro-batch per step, synchronise around each step, median after warm-up. The
step itself is what megatrain's Trainer.train_step does (engine forward with
labels, engine.backward, engine.step). Prints one ``RESULT {json}`` line.

    python bench/megatrain_run.py --shape tinyllama --mb 16 --compile 1
    python bench/megatrain_run.py --shape tinyllama --mb 16 --fp8 tensorwise   # FP8 turns compile on

Without a GPU it runs on the CPU (gloo, bf16, FP8 emulated): only for checking the script at
``--shape toy``; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import SHAPES, device, emit, gpu_name, peak_gib, single_process_env, summarize  # noqa: E402
from bench.common import time_steps  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    p.add_argument("--mb", type=int, default=16, help="micro-batch size (sequences)")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--kernels", default="auto", help="train.fused_kernels: auto | triton | torch")
    p.add_argument("--attention", default="auto", help="SDPA backend first in line (megatrain.model.kernels)")
    p.add_argument("--compile", type=int, default=0, help="torch.compile every block")
    p.add_argument("--zero", type=int, default=1, help="deepspeed.zero_stage")
    p.add_argument("--ckpt", default="none", help="train.activation_checkpointing")
    p.add_argument("--chunk", type=int, default=0, help="train.loss_chunk_tokens (0 = sized from the vocabulary)")
    p.add_argument("--profile", type=int, default=0, help="profile this many extra steps and print the kernel mix")
    p.add_argument("--igu", type=int, default=0,
                   help="experiment: DeepSpeed bf16 immediate_grad_update (added to the engine's DeepSpeed config)")
    p.add_argument("--fp8", default="off", help="train.fp8: off | tensorwise | rowwise | rowwise_with_gw_hp")
    p.add_argument("--fp8_filter", default="auto", help="train.fp8_filter: auto | all")
    p.add_argument("--tag", default="")
    return p.parse_args(argv)


def build_config(a: argparse.Namespace):
    from megatrain.config import load_config

    preset, seq, _ = SHAPES[a.shape]
    return load_config(None, [
        f"model.preset={preset}", f"train.seq_len={seq}", f"train.micro_batch_size={a.mb}",
        "train.precision=bf16", f"deepspeed.zero_stage={a.zero}", f"train.activation_checkpointing={a.ckpt}",
        f"train.fused_kernels={a.kernels}", f"train.compile={bool(a.compile)}", f"train.loss_chunk_tokens={a.chunk}",
        "optimizer.lr=3e-4", "optimizer.beta1=0.9", "optimizer.beta2=0.95", "optimizer.weight_decay=0.1",
        "optimizer.grad_clip=1.0", "schedule.warmup_steps=0", "schedule.decay=constant", "train.max_steps=1000",
        f"train.fp8={a.fp8}", f"train.fp8_filter={a.fp8_filter}",
    ])


def build(a: argparse.Namespace, cfg):
    import deepspeed

    from megatrain.data.batch import plan_batch
    from megatrain.engine import build_ds_config, build_engine
    from megatrain.model import kernels
    from megatrain.parallel.state import ParallelState

    from megatrain.parallel.fp8 import check_fp8

    single_process_env()
    dev = device()
    if dev.type == "cuda":
        torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl" if dev.type == "cuda" else "gloo")
    check_fp8(cfg.train, dev)  # what train.py checks at start
    st = ParallelState.build(1, 1)
    plan = plan_batch(cfg.train, st.dp_size)
    ds_config = build_ds_config(cfg, plan)
    if a.igu:  # a bench experiment, not a config key
        ds_config["bf16"] = {**ds_config.get("bf16", {}), "immediate_grad_update": True}
    built = build_engine(cfg, st, dev, plan, ds_config)  # selects kernels from train.fused_kernels
    # The SDPA backend order has no config key: apply the bench's choice after the engine's default.
    mode = kernels.configure_kernels(a.kernels, a.attention)
    return built, mode  # train.compile and train.activation_checkpointing were applied by build_engine


def estimate_gib(cfg) -> float | None:
    try:
        from megatrain.model.accounting import estimate_memory
    except ImportError:
        return None
    t = cfg.train
    est = estimate_memory(cfg.model, seq_len=t.seq_len, micro_batch=t.micro_batch_size, tp=1, pp=1, dp=1,
                          zero_stage=cfg.deepspeed.zero_stage, offload="none", precision="bf16",
                          checkpointing=t.activation_checkpointing, loss_chunk_tokens=t.loss_chunk_tokens)
    return round(est["total"] / 2**30, 1)


def main(argv=None) -> None:
    a = parse_args(argv)
    cfg = build_config(a)
    built, mode = build(a, cfg)
    engine, seq, vocab, dev = built.engine, cfg.train.seq_len, cfg.model.vocab_size, device()
    gen = torch.Generator(device=dev).manual_seed(0)
    last = {}

    def step(_: int) -> None:
        x = torch.randint(0, vocab, (a.mb, seq + 1), device=dev, generator=gen)
        loss = engine(x[:, :-1], x[:, 1:])
        engine.backward(loss)
        engine.step()
        last["loss"] = loss

    from megatrain.model.accounting import flops_per_token, num_params
    from megatrain.parallelize import blocks_of

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = time_steps(step, a.steps, a.warmup)
    res = {"side": "megatrain", "shape": a.shape, "mb": a.mb, "seq": seq, "kernels": mode, "attention": a.attention,
           "compile": bool(a.compile) or (a.fp8 != "off" and dev.type == "cuda"), "fp8": a.fp8,
           "fp8_linears": sum(getattr(m, "fp8_gemm", None) is not None for m in built.module.modules()),
           "linears": 4 * len(blocks_of(built.module)), "zero": a.zero, "igu": bool(a.igu), "ckpt": a.ckpt, "chunk": a.chunk, "tag": a.tag,
           "params_B": round(num_params(cfg.model)["total"] / 1e9, 3)}
    res.update(summarize(times, a.mb * seq, flops_per_token(cfg.model, seq)))
    res.update({"peak_mem_GiB": peak_gib(),
                "est_mem_GiB": estimate_gib(cfg), "loss_last": round(last["loss"].item(), 3),
                "gpu": gpu_name(), "torch": torch.__version__})
    if a.profile:
        from bench.profile_mix import profile_steps

        res["profile_ms"] = profile_steps(step, a.profile)
    emit(res)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
