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
