"""megatrain -> Hugging Face export, and HF -> megatrain -> HF round trips."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megatrain.checkpoint import layout
from tests.convert.conftest import assert_hf_export_matches, convert, debug_config, make_checkpoint, make_hf_llama

transformers = pytest.importorskip("transformers")

TEXTS = ["Kalomi tenra suvo.", "The quick brown fox jumps over 12 lazy dogs.", "Line one\nline two\n\nend",
         "Unicode: ünïcödé ☃ and tabs\tok", "Zoriba gendar elon."]


def test_export_from_tp2_pp2_loads_and_matches(tmp_path, tokenizer_path):
    cfg = debug_config()
    sd = make_checkpoint(tmp_path / "ck", cfg, tp=2, pp=2, tokenizer=tokenizer_path)
    assert convert(tmp_path / "ck", tmp_path / "hf", "--to", "hf") == 0
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    # .megatrain-convert.json marks the directory as this tool's output (--overwrite may replace only such)
    assert files == [".megatrain-convert.json", "config.json", "generation_config.json", "model.safetensors",
                     "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    hc = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hc["num_key_value_heads"], hc["rms_norm_eps"], hc["tie_word_embeddings"], hc["dtype"]) == \
        (2, 1e-5, False, "float32")
    assert_hf_export_matches(tmp_path / "hf", cfg, sd, tokenizer_path)


def test_tokenizer_loads_slow_fast_and_auto_with_the_same_ids(tmp_path, tokenizer_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer, LlamaTokenizerFast

    make_checkpoint(tmp_path / "ck", debug_config(), tokenizer=tokenizer_path)
    assert convert(tmp_path / "ck", tmp_path / "hf", "--to", "hf", "--no-verify") == 0
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    for cls in (LlamaTokenizer, LlamaTokenizerFast, AutoTokenizer):
        tok = cls.from_pretrained(str(tmp_path / "hf"))
        assert len(tok) == 512 and (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
        for text in TEXTS:
            ids = tok(text)["input_ids"]
            assert ids == [1] + sp.encode(text), (cls.__name__, text)
            assert tok.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode(text))


def test_sharded_bf16_export_with_index(tmp_path, tokenizer_path):
    cfg = debug_config()
    sd = make_checkpoint(tmp_path / "ck", cfg, tokenizer=tokenizer_path)
    assert convert(tmp_path / "ck", tmp_path / "hf", "--to", "hf", "--dtype", "bf16", "--max-shard-size", "60KB") == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    total = 0
    for name in shards:
        assert (tmp_path / "hf" / name).stat().st_size <= 60_000 + 20_000  # cap + header; no tensor exceeds it
        for k, t in load_file(str(tmp_path / "hf" / name)).items():
            assert t.dtype == torch.bfloat16 and index["weight_map"][k] == name
            total += t.numel() * 2
    assert index["metadata"]["total_size"] == total
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    emb = model.get_input_embeddings().weight
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, sd["embed.embed.weight"].to(torch.bfloat16))


@pytest.mark.parametrize("tied,dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_round_trip_hf_megatrain_tp2_hf_is_bitwise(tmp_path, tokenizer_path, tied, dtype):
    # GQA, Llama-3 RoPE scaling, non-default eps and theta
    src = make_hf_llama(tmp_path / "src", tokenizer_path, dtype=dtype, tie_word_embeddings=tied, rms_norm_eps=1e-6,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 32})
    assert convert(src, tmp_path / "mt", "--to", "megatrain", "--tp", "2") == 0
    meta = layout.read_meta(tmp_path / "mt")
    assert meta["weights_only"] and meta["step"] == 0 and meta["topology"]["tp"] == 2
    assert meta["config"]["model"]["rope_scaling"]["original_max_position_embeddings"] == 32
    assert (tmp_path / "mt" / "tokenizer.model").is_file() and meta["tokenizer_sha256"]
    assert convert(tmp_path / "mt", tmp_path / "back", "--to", "hf") == 0
    a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for name in ("config.json", "generation_config.json"):
        assert json.loads((src / name).read_text()) == json.loads((tmp_path / "back" / name).read_text()), name
    c1 = transformers.AutoConfig.from_pretrained(str(src)).to_dict()
    c2 = transformers.AutoConfig.from_pretrained(str(tmp_path / "back")).to_dict()
    c1.pop("_name_or_path"), c2.pop("_name_or_path")
    assert c1 == c2
    with safe_open(str(tmp_path / "back" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
