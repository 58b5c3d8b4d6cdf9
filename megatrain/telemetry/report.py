"""What a run will cost, printed at start and by ``--dry-run``: batch, parameters, FLOPs, memory."""

from __future__ import annotations

from megatrain.config import Config, config_to_yaml
from megatrain.data.batch import BatchPlan, plan_batch
from megatrain.telemetry.metrics import human_count
from megatrain.model.accounting import estimate_memory, flops_per_token, num_params


def _summary(cfg: Config, world: int, dp: int, plan: BatchPlan) -> list[str]:
    m, t = cfg.model, cfg.train
    n = num_params(m)
    fpt = flops_per_token(m, t.seq_len)
    tokens = t.max_steps * plan.global_batch * t.seq_len
    precision = t.precision if t.precision != "auto" else "bf16 (GPU) / fp32 (CPU)"
    p = cfg.parallel
    mem = estimate_memory(m, seq_len=t.seq_len, micro_batch=plan.micro_batch, tp=p.tensor,
                          pp=p.pipeline, dp=dp, zero_stage=cfg.deepspeed.zero_stage,
                          offload=cfg.deepspeed.offload, precision="fp32" if t.precision == "fp32" else "bf16",
                          checkpointing=t.activation_checkpointing, loss_chunk_tokens=t.loss_chunk_tokens,
                          sequence_parallel=p.sequence_parallel, cp=p.context)
    gib = {k: v / 2**30 for k, v in mem.items()}
    return [
        f"model: {m.preset or 'custom'} | {human_count(n['total'])} parameters ({n['total']:,}; embedding "
        f"{human_count(n['embedding'])}, blocks {human_count(n['blocks'])}, head "
        f"{human_count(n['head']) if n['head'] else 'tied'}) | {m.num_layers} layers, hidden {m.hidden_size}, "
        f"heads {m.num_heads}/{m.kv_heads} KV, FFN {m.ffn_size}, vocab {m.vocab_size}",
        f"parallel: world {world} = TP {p.tensor}{' (+SP)' if p.sequence_parallel else ''} x CP {p.context} x "
        f"PP {p.pipeline} x DP {dp} | ZeRO-{cfg.deepspeed.zero_stage} (sharded over DP x CP = {dp * p.context}), "
        f"offload {cfg.deepspeed.offload} | precision {precision}",
        f"sequence: {t.seq_len:,} tokens = {t.seq_len // p.context:,} per context rank"
        + (f", {t.seq_len // p.context // p.tensor:,} per rank between TP regions (SP)" if p.sequence_parallel else ""),
        f"batch: micro-batch {plan.micro_batch} x accumulation {plan.grad_accum} x DP {dp} = {plan.global_batch} "
        f"samples x {t.seq_len} tokens = {plan.global_batch * t.seq_len:,} tokens/step",
        f"compute: {fpt / 1e9:.2f} GFLOP/token (PaLM: 6N + 12 L h s) | {t.max_steps:,} steps = "
        f"{human_count(tokens)} tokens = {fpt * tokens:.3e} FLOPs (6ND-style) | Chinchilla-optimal "
        f"{human_count(20 * n['total'])} tokens (20/param; this run is {tokens / (20 * n['total']):.2%} of it)",
        _fp8_line(cfg),
        "memory per GPU (estimate): " + ", ".join(f"{k} {v:.2f} GiB" for k, v in gib.items() if k != "total")
        + f" | total {gib['total']:.2f} GiB",
    ]


def _fp8_line(cfg: Config) -> str:
    import torch

    from megatrain.parallel.fp8 import describe_plan, fp8_compiles, plan_fp8

    t = cfg.train
    if t.fp8 == "off":
        return "fp8: off"
    gpu = torch.cuda.is_available()
    compile_on = t.compile or fp8_compiles(t, "cuda" if gpu else "cpu")
    return describe_plan(plan_fp8(cfg.model, cfg.parallel.tensor, t), t.fp8, compile_on)


def start_report(cfg: Config, world: int, dp: int, plan: BatchPlan) -> str:
    return "\n".join(["run plan:"] + ["  " + line for line in _summary(cfg, world, dp, plan)])


def dry_run_report(cfg: Config, world: int) -> str:
    from megatrain.config import validate_world

    validate_world(cfg, world)
    dp = world // (cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.context)
    plan = plan_batch(cfg.train, dp)
    return "\n".join(["# resolved config", config_to_yaml(cfg).rstrip(), "", "# plan"] + _summary(cfg, world, dp, plan))
