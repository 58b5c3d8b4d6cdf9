"""Parameter counts and FLOPs per token, exactly as the model is built."""

from __future__ import annotations

from megatrain.config import ModelConfig


def num_block_params(cfg: ModelConfig) -> int:
    c, d = cfg.hidden_size, cfg.head_dim
    attn = c * (cfg.num_heads + 2 * cfg.kv_heads) * d + cfg.num_heads * d * c
    mlp = 3 * c * cfg.ffn_size
    return attn + mlp + 2 * c  # + two RMSNorm weights


def num_params(cfg: ModelConfig) -> dict[str, int]:
    """Counts by role; ``total`` counts a tied embedding/head once."""
    embed = cfg.vocab_size * cfg.hidden_size
    head = 0 if cfg.tie_embeddings else embed
    blocks = cfg.num_layers * num_block_params(cfg)
    total = embed + blocks + cfg.hidden_size + head
    return {"embedding": embed, "blocks": blocks, "final_norm": cfg.hidden_size, "head": head, "total": total}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token by the PaLM convention (Megatron, torchtitan, the baseline script):
    6 x (parameters except the input embedding, the LM head counted even when tied)
    + 12 x layers x hidden x seq_len for attention scores and values. No discount for the causal
    mask, recomputation not counted (MFU, not HFU)."""
    n = num_params(cfg)
    matmul_params = n["total"] - n["embedding"] + (n["embedding"] if cfg.tie_embeddings else 0)
    return 6.0 * matmul_params + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len


def estimate_memory(cfg: ModelConfig, *, seq_len: int, micro_batch: int, tp: int, pp: int, dp: int,
                    zero_stage: int, offload: str, precision: str, checkpointing: str = "none",
                    loss_chunk_tokens: int = 0, sequence_parallel: bool = False, cp: int = 1) -> dict[str, float]:
    """Bytes per GPU by component, for the rank that holds the most (first pipeline stage).

    Weights, gradients and AdamW state follow ZeRO's partitioning (stage 1 shards optimizer state,
    2 also gradients, 3 also weights) over the data x context ranks (``dp`` x ``cp``: context ranks hold
    the same weights). Activations per layer follow Korthikanti et al. 2022 with flash attention (no
    s^2 term): s*b*h*(10 + 24/t) bytes in 16-bit (doubled in fp32), or s*b*h*34/t with sequence
    parallelism, whose norms, residual adds and dropouts hold s/t tokens; context parallelism holds s/cp
    tokens of everything (attention works on the whole sequence for 1/cp of the heads: the same count).
    1F1B keeps ``pp`` micro-batches in flight on the first stage, which holds L/pp layers, so the stage
    holds about L layers' worth. Full recomputation keeps only each layer's input plus one layer's
    working set. Selective recomputation (megatrain/parallelize.py) keeps the layer input and the outputs
    of every GEMM and of attention: q/k/v, the attention output, the output projection, gate and up, and
    the down projection."""
    n = num_params(cfg)
    per_rank = (n["total"] - n["embedding"] - n["head"]) / (tp * pp) + (n["embedding"] + n["head"]) / tp / min(pp, 2)
    half = precision in ("bf16", "fp16")
    wbytes = 2 if half else 4
    shards = dp * cp
    weights = per_rank * wbytes / (shards if zero_stage == 3 else 1)
    grads = per_rank * wbytes / (shards if zero_stage >= 2 else 1)
    # AdamW: fp32 m and v, plus an fp32 master copy of the weights under mixed precision.
    opt = per_rank * (12 if half else 8) / (shards if zero_stage >= 1 else 1)
    if offload in ("optimizer", "all"):
        opt = 0.0
    if offload == "all":
        weights = 0.0
    out = {"weights": weights, "gradients": grads, "optimizer": opt,
           "activations": _activations(cfg, seq_len // cp, micro_batch, tp, half, checkpointing, sequence_parallel)}
    from megatrain.parallel.cross_entropy import auto_chunk_tokens

    s, b, h = seq_len // cp, micro_batch, cfg.hidden_size
    chunk = loss_chunk_tokens or auto_chunk_tokens(cfg.vocab_size // tp)
    # one chunk of fp32 logits plus the head's input gathered over TP (s/cp tokens) and its gradient
    out["loss"] = min(chunk, s * b) * (cfg.vocab_size // tp) * 4 + s * b * h * wbytes
    out["total"] = sum(out.values())
    return out


def _activations(cfg: ModelConfig, s: int, b: int, tp: int, half: bool, checkpointing: str, sp: bool) -> float:
    """Activation bytes of all layers for ``s`` tokens per rank (already divided by the context degree)."""
    h = cfg.hidden_size
    act_scale = 1 if half else 2
    per_layer = s * b * h * (34 / tp if sp else 10 + 24 / tp) * act_scale
    split = tp if sp else 1  # what lives between TP regions: s/tp tokens under sequence parallelism
    if checkpointing == "full":
        return cfg.num_layers * 2 * s * b * h / split * act_scale + per_layer
    if checkpointing == "selective":
        qkv = (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim
        saved = (qkv + h + 2 * cfg.ffn_size) / tp + 3 * h / split  # column-parallel outputs split; row-parallel
        return cfg.num_layers * s * b * saved * 2 * act_scale + per_layer
    return cfg.num_layers * per_layer
