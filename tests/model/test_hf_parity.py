"""megatrain's LLaMA computes what Hugging Face's LlamaForCausalLM computes for the same weights."""

import pytest
import torch

from megatrain.config import load_config
from megatrain.model import build_model
from megatrain.model.hf import from_hf_state_dict, hf_config_dict, model_config_from_hf, to_hf_state_dict

transformers = pytest.importorskip("transformers")

SCALING = "{factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 32}"


def _hf_model(cfg):
    hc = transformers.LlamaConfig(**{k: v for k, v in hf_config_dict(cfg).items() if k != "architectures"})
    return transformers.LlamaForCausalLM(hc).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_hugging_face(tied):
    # GQA (4 heads over 2 KV heads) and Llama-3 RoPE scaling with a short original context, so that
    # positions 0..95 cross all three bands of the scaling (kept, interpolated, slowed).
    cfg = load_config(None, ["model.preset=debug", f"model.rope_scaling={SCALING}", "model.rope_theta=500000",
                             f"model.tie_embeddings={tied}", "model.norm_eps=1e-6"]).model
    ours = build_model(cfg, seed=3).eval()
    hf = _hf_model(cfg)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert not unexpected and all("rotary" in m or (tied and m == "lm_head.weight") for m in missing)
    tokens = torch.randint(0, cfg.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(tokens)
        b = hf(tokens).logits
    assert (a - b).abs().max().item() <= 1e-4
    # and the loss: HF shifts labels itself; ours takes labels already aligned with inputs
    with torch.no_grad():
        ref = hf(tokens, labels=tokens).loss
        got = ours(tokens[:, :-1], tokens[:, 1:])
    assert abs(ref.item() - got.item()) <= 1e-5


def test_negative_control_detects_a_wrong_weight():
    cfg = load_config(None, ["model.preset=debug"]).model
    ours = build_model(cfg, seed=3).eval()
    hf = _hf_model(cfg)
    sd = to_hf_state_dict(ours.state_dict(), cfg)
    # swapping the K and V projections of one layer must be caught by the comparison
    sd["model.layers.0.self_attn.k_proj.weight"], sd["model.layers.0.self_attn.v_proj.weight"] = (
        sd["model.layers.0.self_attn.v_proj.weight"], sd["model.layers.0.self_attn.k_proj.weight"])
    hf.load_state_dict(sd, strict=False)
    tokens = torch.randint(0, cfg.vocab_size, (1, 32))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() > 1e-3


def test_state_dict_round_trip_and_config_round_trip():
    cfg = load_config(None, ["model.preset=debug", f"model.rope_scaling={SCALING}"]).model
    sd = build_model(cfg, seed=1).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd, cfg), cfg)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    cfg2 = model_config_from_hf(hf_config_dict(cfg))
    for f in ("hidden_size", "num_layers", "num_heads", "kv_heads", "ffn_size", "vocab_size", "norm_eps",
              "rope_theta", "rope_scaling", "tie_embeddings"):
        assert getattr(cfg2, f) == getattr(cfg, f), f


def test_config_written_by_transformers_keeps_rope_scaling():
    # transformers >= 5 moves rope_theta and the scaling into rope_parameters when it saves a config
    cfg = load_config(None, ["model.preset=debug", f"model.rope_scaling={SCALING}", "model.rope_theta=500000"]).model
    saved = transformers.LlamaConfig(**{k: v for k, v in hf_config_dict(cfg).items() if k != "architectures"})
    back = model_config_from_hf(saved.to_dict())
    assert back.rope_scaling == cfg.rope_scaling and back.rope_theta == cfg.rope_theta
