"""The baseline megatrain is measured against: Hugging Face LlamaForCausalLM through DeepSpeed on one GPU.

A copy of shared/reference/baseline_hf_ds.py with the model, DeepSpeed config and
step unchanged (HF SDPA attention, ZeRO-2, bf16, DeepSpeed AdamW = FusedAdam,
lr 3e-4, betas 0.9/0.95, weight decay 0.1, clipping 1.0, optional Liger kernels
including its fused linear cross-entropy). Only the bookkeeping differs: the
warm-up count is an argument, the step-time spread is reported, and the result
line has the fields bench/run_bench.py tabulates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import device, emit, gpu_name, peak_gib, single_process_env, summarize, time_steps  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=2048); p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32); p.add_argument("--kv", type=int, default=4)
    p.add_argument("--ffn", type=int, default=5632); p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048); p.add_argument("--mb", type=int, default=4)
    p.add_argument("--zero", type=int, default=2); p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--liger", action="store_true"); p.add_argument("--tie", action="store_true")
    p.add_argument("--ckpt", action="store_true")
    p.add_argument("--shape", default=""); p.add_argument("--profile", type=int, default=0)
    p.add_argument("--tag", default="hf+ds"); p.add_argument("--local_rank", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> None:
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    a = parse_args(argv)
    single_process_env()
    deepspeed.init_distributed()
    cfg = LlamaConfig(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv, intermediate_size=a.ffn, vocab_size=a.vocab,
                      max_position_embeddings=a.seq, attn_implementation="sdpa", tie_word_embeddings=a.tie,
                      torch_dtype=torch.bfloat16)
    if a.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()
    model = LlamaForCausalLM(cfg)
    if a.ckpt:
        model.gradient_checkpointing_enable()
    n_params = sum(p.numel() for p in model.parameters())
    n_emb = model.model.embed_tokens.weight.numel()
    ds = {"train_micro_batch_size_per_gpu": a.mb, "gradient_accumulation_steps": 1,
          "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}},
          "bf16": {"enabled": True}, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": a.zero}, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    dev = device()
    opt = None
    if dev.type == "cpu":  # toy-size check of the script only: DeepSpeed's FusedAdam needs a GPU
        opt = torch.optim.AdamW(model.parameters(), **ds.pop("optimizer")["params"])
        ds["zero_force_ds_cpu_optimizer"] = False
    eng, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), optimizer=opt, config=ds)
    g = torch.Generator(device=dev).manual_seed(0)
    last = {}

    def step(_: int) -> None:
        x = torch.randint(0, a.vocab, (a.mb, a.seq + 1), device=dev, generator=g)
        out = eng(input_ids=x[:, :-1], labels=x[:, :-1])
        eng.backward(out.loss)
        eng.step()
        last["loss"] = out.loss

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = time_steps(step, a.steps, a.warmup)
    n_matmul = (n_params - n_emb) + (n_emb if a.tie else 0)  # the LM head is a matmul even when tied
    flops_per_tok = 6 * n_matmul + 12 * a.layers * a.hidden * a.seq  # PaLM convention, no causal discount
    res = {"side": "baseline", "shape": a.shape, "tag": a.tag, "mb": a.mb, "seq": a.seq, "zero": a.zero,
           "liger": a.liger, "ckpt": a.ckpt, "params_B": round(n_params / 1e9, 3)}
    res.update(summarize(times, a.mb * a.seq, flops_per_tok))
    res.update({"peak_mem_GiB": peak_gib(),
                "loss_last": round(last["loss"].item(), 3), "gpu": gpu_name(), "torch": torch.__version__})
    if a.profile:
        from bench.profile_mix import profile_steps

        res["profile_ms"] = profile_steps(step, a.profile)
    emit(res)


if __name__ == "__main__":
    main()
