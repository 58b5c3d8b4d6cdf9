"""megatrain -> GGUF: metadata, vocabulary, tensor names, shapes, values, and the Q/K permutation."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm
import torch

from megatrain.convert.gguf_export import permute_qk, read_gguf, unpermute_qk
from megatrain.model.hf import to_hf_state_dict
from tests.convert.conftest import convert, debug_config, make_checkpoint, train_tiny_tokenizer

gguf = pytest.importorskip("gguf")

PARTS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The permutation as llama.cpp's convert_hf_to_gguf.py writes it (reshape, swap axes 1 and 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def f32_export(tmp_path_factory, tokenizer_path):
    tmp = tmp_path_factory.mktemp("gguf")
    cfg = debug_config()
    sd = make_checkpoint(tmp / "ck", cfg, tp=2, tokenizer=tokenizer_path)
    assert convert(tmp / "ck", tmp / "m.gguf", "--to", "gguf", "--outtype", "f32") == 0
    fields, tensors = read_gguf(tmp / "m.gguf")
    return cfg, sd, fields, tensors, tmp / "m.gguf"


def test_metadata(f32_export):
    cfg, _, f, _, _ = f32_export
    m = cfg.model
    assert f["general.architecture"] == "llama" and f["general.name"] == "m"
    assert (f["llama.context_length"], f["llama.embedding_length"], f["llama.block_count"],
            f["llama.feed_forward_length"], f["llama.attention.head_count"], f["llama.attention.head_count_kv"],
            f["llama.rope.dimension_count"], f["llama.vocab_size"]) == (256, 64, 2, 160, 4, 2, 16, 512)
    assert f["llama.rope.freq_base"] == pytest.approx(m.rope_theta)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(m.norm_eps)
    assert f["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)


def test_vocabulary_scores_types_and_special_ids(f32_export, tokenizer_path):
    _, _, f, _, _ = f32_export
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    n = sp.get_piece_size()
    assert f["tokenizer.ggml.model"] == "llama"
    assert f["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)]
    assert f["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(n)])
    T = gguf.TokenType
    want = [T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else T.BYTE if sp.is_byte(i)
            else T.NORMAL for i in range(n)]
    assert f["tokenizer.ggml.token_type"] == [int(t) for t in want]
    assert f["tokenizer.ggml.token_type"][:4] == [int(T.UNKNOWN), int(T.CONTROL), int(T.CONTROL), int(T.BYTE)]
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.unknown_token_id"]) \
        == (1, 2, 0)
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False


def test_tensor_names_shapes_and_exact_values(f32_export):
    cfg, sd, _, tensors, path = f32_export
    m = cfg.model
    want = {"token_embd.weight", "output_norm.weight", "output.weight"} | \
        {f"blk.{i}.{p}.weight" for i in range(m.num_layers) for p in PARTS}
    assert set(tensors) == want
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:  # GGUF lists dimensions innermost first
        assert [int(x) for x in t.shape] == list(reversed(tensors[t.name].shape))
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
    hf = to_hf_state_dict(sd, m)
    assert torch.equal(tensors["token_embd.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(tensors["output.weight"], hf["lm_head.weight"])
    assert tensors["blk.1.ffn_gate.weight"].shape == (160, 64)
    for i in range(m.num_layers):
        q, k = hf[f"model.layers.{i}.self_attn.q_proj.weight"], hf[f"model.layers.{i}.self_attn.k_proj.weight"]
        assert np.array_equal(tensors[f"blk.{i}.attn_q.weight"].numpy(), llama_cpp_permute(q.numpy(), m.num_heads))
        assert np.array_equal(tensors[f"blk.{i}.attn_k.weight"].numpy(), llama_cpp_permute(k.numpy(), m.kv_heads))
        assert torch.equal(unpermute_qk(tensors[f"blk.{i}.attn_q.weight"], m.num_heads), q)
        assert torch.equal(tensors[f"blk.{i}.attn_v.weight"], hf[f"model.layers.{i}.self_attn.v_proj.weight"])
        assert torch.equal(tensors[f"blk.{i}.ffn_down.weight"], hf[f"model.layers.{i}.mlp.down_proj.weight"])


def _rope_half(x: torch.Tensor, ang: torch.Tensor) -> torch.Tensor:  # HF: pairs (i, i + D/2)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], dim=-1)


def _rope_interleaved(x: torch.Tensor, ang: torch.Tensor) -> torch.Tensor:  # llama.cpp: pairs (2i, 2i + 1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], dim=-1).flatten(-2)


def test_permuted_qk_under_interleaved_rope_give_hf_attention_scores():
    """Why the permutation: llama.cpp's interleaved RoPE on permuted Q/K rows yields exactly the
    attention scores HF's rotate-half RoPE yields on the original rows (GQA: 4 query heads, 2 KV heads)."""
    g = torch.Generator().manual_seed(0)
    heads, kv, d, c, t = 4, 2, 16, 64, 7
    wq, wk = torch.randn(heads * d, c, generator=g), torch.randn(kv * d, c, generator=g)
    x = torch.randn(t, c, generator=g)
    ang = torch.arange(t)[:, None, None] * (10000.0 ** (-torch.arange(0, d, 2) / d))[None, None]  # (T, 1, D/2)

    def scores(q_w, k_w, rope):
        q = rope((x @ q_w.T).view(t, heads, d), ang)  # (T, H, D)
        k = rope((x @ k_w.T).view(t, kv, d), ang).repeat_interleave(heads // kv, dim=1)
        return torch.einsum("thd,shd->hts", q, k)

    ref = scores(wq, wk, _rope_half)
    got = scores(permute_qk(wq, heads), permute_qk(wk, kv), _rope_interleaved)
    assert (ref - got).abs().max().item() < 1e-3 * ref.abs().max().item()
    assert (ref - scores(wq, wk, _rope_interleaved)).abs().max().item() > 1.0  # unpermuted: wrong


@pytest.mark.parametrize("outtype,qtype", [("q8_0", "Q8_0"), ("bf16", "BF16"), ("f16", "F16")])
def test_reduced_types(tmp_path, tokenizer_path, outtype, qtype):
    cfg = debug_config("model.rope_scaling={factor: 8.0, original_max_position_embeddings: 32}",
                       "model.tie_embeddings=true")
    sd = make_checkpoint(tmp_path / "ck", cfg, tokenizer=tokenizer_path)
    assert convert(tmp_path / "ck", tmp_path / "m.gguf", "--to", "gguf", "--outtype", outtype) == 0
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied: llama.cpp reads token_embd for the output
    assert types["rope_freqs.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["token_embd.weight"] == qtype and types["blk.1.ffn_down.weight"] == qtype
    _, tensors = read_gguf(tmp_path / "m.gguf")
    factors = tensors["rope_freqs.weight"]
    assert factors.shape == (8,) and factors[0] == 1.0 and factors[-1] == pytest.approx(8.0)
    emb = sd["embed.embed.weight"]
    err = (tensors["token_embd.weight"] - emb).abs().max().item()
    assert 0 < err <= 0.02 * emb.abs().max().item()


def test_padded_vocabulary_needs_consent(tmp_path):
    small = train_tiny_tokenizer(tmp_path / "small", 400)
    make_checkpoint(tmp_path / "ck", debug_config())
    assert convert(tmp_path / "ck", tmp_path / "m.gguf", "--to", "gguf", "--tokenizer", small) == 2
    assert convert(tmp_path / "ck", tmp_path / "m.gguf", "--to", "gguf", "--tokenizer", small,
                   "--allow-padded-vocab", "--no-verify") == 0
    fields, _ = read_gguf(tmp_path / "m.gguf")
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == 512 and tokens[400] == "[PAD400]" and types[511] == int(gguf.TokenType.UNUSED)
