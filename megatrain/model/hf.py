"""Mapping between megatrain's canonical (unsharded) weights and Hugging Face's Llama layout.

Both use the "rotate half" RoPE layout, so Q and K need no permutation; the only
reshaping is megatrain's fused, KV-grouped QKV weight and fused gate/up weight.
"""

from __future__ import annotations

from typing import Any

import torch

from megatrain.config import ConfigError, ModelConfig, RopeScalingConfig


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Canonical megatrain tensors (names of ``LlamaModel.state_dict()`` at TP=1) -> HF Llama names."""
    k, r, d = cfg.kv_heads, cfg.num_heads // cfg.kv_heads, cfg.head_dim
    c = cfg.hidden_size
    out = {"model.embed_tokens.weight": sd["embed.embed.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(cfg.num_layers):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        qkv = sd[p + "attn.qkv.weight"].view(k, r + 2, d, c)
        out[q + "self_attn.q_proj.weight"] = qkv[:, :r].reshape(k * r * d, c).clone()
        out[q + "self_attn.k_proj.weight"] = qkv[:, r].reshape(k * d, c).clone()
        out[q + "self_attn.v_proj.weight"] = qkv[:, r + 1].reshape(k * d, c).clone()
        out[q + "self_attn.o_proj.weight"] = sd[p + "attn.o.weight"]
        gate_up = sd[p + "mlp.gate_up.weight"].view(2, cfg.ffn_size, c)
        out[q + "mlp.gate_proj.weight"] = gate_up[0].clone()
        out[q + "mlp.up_proj.weight"] = gate_up[1].clone()
        out[q + "mlp.down_proj.weight"] = sd[p + "mlp.down.weight"]
        out[q + "input_layernorm.weight"] = sd[p + "attn_norm.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "mlp_norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["head.proj.weight"]
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Llama tensors -> canonical megatrain tensors. Missing tensors raise naming the key."""

    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise ConfigError(f"Hugging Face checkpoint: tensor {name!r} is missing")
        return hf[name]

    k, r, d = cfg.kv_heads, cfg.num_heads // cfg.kv_heads, cfg.head_dim
    c = cfg.hidden_size
    sd = {"embed.embed.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    for i in range(cfg.num_layers):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        qw = get(q + "self_attn.q_proj.weight").view(k, r, d, c)
        kw = get(q + "self_attn.k_proj.weight").view(k, 1, d, c)
        vw = get(q + "self_attn.v_proj.weight").view(k, 1, d, c)
        sd[p + "attn.qkv.weight"] = torch.cat([qw, kw, vw], dim=1).contiguous()
        sd[p + "attn.o.weight"] = get(q + "self_attn.o_proj.weight")
        sd[p + "mlp.gate_up.weight"] = torch.stack([get(q + "mlp.gate_proj.weight"),
                                                    get(q + "mlp.up_proj.weight")]).contiguous()
        sd[p + "mlp.down.weight"] = get(q + "mlp.down_proj.weight")
        sd[p + "attn_norm.weight"] = get(q + "input_layernorm.weight")
        sd[p + "mlp_norm.weight"] = get(q + "post_attention_layernorm.weight")
    if not cfg.tie_embeddings:
        sd["head.proj.weight"] = get("lm_head.weight") if "lm_head.weight" in hf else hf["model.embed_tokens.weight"]
    return sd


def hf_config_dict(cfg: ModelConfig, dtype: str = "float32", bos_id: int = 1, eos_id: int = 2) -> dict[str, Any]:
    """The ``config.json`` of an HF ``LlamaForCausalLM`` with the same architecture."""
    d: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": cfg.init_std, "torch_dtype": dtype,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "use_cache": True, "pretraining_tp": 1,
        "rope_scaling": None,
    }
    s = cfg.rope_scaling
    if s is not None:
        d["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                             "high_freq_factor": s.high_freq_factor,
                             "original_max_position_embeddings": s.original_max_position_embeddings}
    return d


def model_config_from_hf(hc: dict[str, Any]) -> ModelConfig:
    """A megatrain ModelConfig from an HF Llama ``config.json``; unsupported features are errors."""
    if hc.get("model_type") != "llama":
        raise ConfigError(f"config.json: model_type={hc.get('model_type')!r}; only 'llama' is supported")
    for key in ("attention_bias", "mlp_bias"):
        if hc.get(key):
            raise ConfigError(f"config.json: {key}=true is not supported (LLaMA has no biases)")
    if hc.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: hidden_act={hc['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    heads = hc["num_attention_heads"]
    if not isinstance(heads, int) or heads <= 0:
        raise ConfigError(f"config.json: num_attention_heads={heads!r}; must be a positive integer")
    if hc.get("head_dim") not in (None, hc["hidden_size"] // heads):
        raise ConfigError(f"config.json: head_dim={hc['head_dim']} differs from hidden_size/num_attention_heads; "
                          f"not supported")
    # transformers >= 5 writes rope_parameters (with rope_theta inside); older versions rope_scaling.
    rp = hc.get("rope_parameters") or {}
    rs = hc.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    scaling = None
    if rs is not None:
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise ConfigError(f"config.json: rope_scaling type {kind!r} is not supported (only 'llama3')")
        else:
            scaling = RopeScalingConfig(factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                                        high_freq_factor=float(rs["high_freq_factor"]),
                                        original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
    theta = hc.get("rope_theta", rp.get("rope_theta", 10000.0))
    return ModelConfig(hidden_size=hc["hidden_size"], num_layers=hc["num_hidden_layers"], num_heads=heads,
                       num_kv_heads=hc.get("num_key_value_heads", heads), ffn_hidden_size=hc["intermediate_size"],
                       vocab_size=hc["vocab_size"], norm_eps=_number("rms_norm_eps", hc.get("rms_norm_eps", 1e-5)),
                       rope_theta=_number("rope_theta", theta), rope_scaling=scaling,
                       max_seq_len=hc.get("max_position_embeddings", 2048),
                       tie_embeddings=bool(hc.get("tie_word_embeddings", False)),
                       init_std=_number("initializer_range", hc.get("initializer_range", 0.02)))


def _number(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"config.json: {key}={v!r}; must be a number")
    return float(v)
