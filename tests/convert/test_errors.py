"""Bad inputs give one clear error (exit 2) naming the file or field; a failed verification writes nothing."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from megatrain.checkpoint import layout
from megatrain.convert import cli
from tests.convert.conftest import convert, debug_config, make_checkpoint, train_tiny_tokenizer


def _err(capsys) -> str:
    return capsys.readouterr().err


def test_not_a_checkpoint_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    for d in ("empty", "junk"):
        assert convert(tmp_path / d, tmp_path / "out", "--to", "hf") == 2
        assert f"{tmp_path / d}: not a megatrain checkpoint" in _err(capsys)
    assert convert(tmp_path / "missing", tmp_path / "out", "--to", "hf") == 2
    assert "no such file or directory" in _err(capsys)
    assert not (tmp_path / "out").exists()


def test_partial_checkpoint(tmp_path, capsys):
    make_checkpoint(tmp_path / "step_00000005", debug_config())
    (tmp_path / "step_00000005" / layout.COMPLETE).unlink()
    assert convert(tmp_path / "step_00000005", tmp_path / "out", "--to", "hf", "--no-tokenizer") == 2
    err = _err(capsys)
    assert "step_00000005: partial checkpoint (no COMPLETE" in err and "use an older checkpoint" in err
    # through the checkpoints root: no complete checkpoint at all
    assert convert(tmp_path, tmp_path / "out", "--to", "hf", "--no-tokenizer") == 2
    assert "holds no complete checkpoint" in _err(capsys)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer_path):
    tmp = tmp_path_factory.mktemp("hf")
    make_checkpoint(tmp / "ck", debug_config(), tokenizer=tokenizer_path)
    assert convert(tmp / "ck", tmp / "hf", "--to", "hf", "--no-verify") == 0
    return tmp / "hf"


@pytest.mark.parametrize("change,needle", [
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "architectures=['MistralForCausalLM']"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config is set"),
    ({"head_dim": 32}, "head_dim=32 differs"),
    # out of range: named before any tensor is built
    ({"num_attention_heads": 0}, "num_attention_heads=0; must be a positive integer"),
    ({"rms_norm_eps": None}, "rms_norm_eps"),
    ({"rms_norm_eps": -1.0}, "model.norm_eps=-1.0: must be > 0"),
])
def test_unsupported_hf_config_feature(hf_dir, tmp_path, capsys, change, needle):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    hc = json.loads((src / "config.json").read_text())
    hc.update(change)
    (src / "config.json").write_text(json.dumps(hc))
    assert convert(src, tmp_path / "out", "--to", "megatrain") == 2
    err = _err(capsys)
    assert needle in err and "config.json" in err, err


def _damaged_copy(hf_dir, dst, **writes):
    import shutil

    shutil.copytree(hf_dir, dst)
    for name, data in writes.items():
        path = dst / name.replace("__", ".")
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return dst


@pytest.mark.parametrize("writes,needle", [
    ({"config__json": "{x"}, "config.json: not valid JSON"),
    ({"config__json": "[1, 2]"}, "config.json: the top level must be a JSON object"),
    ({"model__safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"}, "not a readable safetensors file"),
    ({"model__safetensors": None}, "has a config.json but no weights"),
])
def test_damaged_hf_download_is_named(hf_dir, tmp_path, capsys, writes, needle):
    src = _damaged_copy(hf_dir, tmp_path / "src", **writes)
    assert convert(src, tmp_path / "out", "--to", "megatrain") == 2
    err = _err(capsys)
    assert needle in err and str(src) in err, err
    assert not (tmp_path / "out").exists()


def test_unexpected_hf_tensor_is_refused(hf_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    sd = load_file(str(src / "model.safetensors"))
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert convert(src, tmp_path / "out", "--to", "megatrain") == 2
    assert "q_proj.bias" in _err(capsys)


def test_pickle_with_objects_is_refused(hf_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(hf_dir / "config.json", src / "config.json")
    sd = load_file(str(hf_dir / "model.safetensors"))
    sd["__extra__"] = argparse.Namespace(payload="x")  # an arbitrary object: weights_only=True refuses it
    torch.save(sd, src / "pytorch_model.bin")
    assert convert(src, tmp_path / "out", "--to", "megatrain") == 2
    assert "pytorch_model.bin: refused to load" in _err(capsys)
    torch.save(load_file(str(hf_dir / "model.safetensors")), src / "pytorch_model.bin")  # plain tensors: fine
    assert convert(src, tmp_path / "out", "--to", "megatrain", "--no-verify") == 0


def test_tokenizer_size_disagrees_with_embedding(tmp_path, capsys):
    small = train_tiny_tokenizer(tmp_path / "small", 400)
    make_checkpoint(tmp_path / "ck", debug_config())
    assert convert(tmp_path / "ck", tmp_path / "out", "--to", "hf", "--tokenizer", small) == 2
    err = _err(capsys)
    assert "has 400 pieces but the model's embedding has 512 rows" in err and str(small) in err


def test_tokenizer_other_than_the_recorded_one(tmp_path, tokenizer_path, capsys):
    other = train_tiny_tokenizer(tmp_path / "other", 512, seed=1)
    make_checkpoint(tmp_path / "ck", debug_config(), tokenizer=tokenizer_path)
    # a converted checkpoint records its tokenizer's SHA-256; a different tokenizer is then refused
    assert convert(tmp_path / "ck", tmp_path / "mt", "--to", "megatrain", "--no-verify") == 0
    capsys.readouterr()
    assert convert(tmp_path / "mt", tmp_path / "out", "--to", "hf", "--tokenizer", other) == 2
    assert "the checkpoint was trained with" in _err(capsys)


def test_existing_output_needs_overwrite(tmp_path, tokenizer_path, capsys):
    make_checkpoint(tmp_path / "ck", debug_config(), tokenizer=tokenizer_path)
    for to, out in (("hf", "hf"), ("megatrain", "mt"), ("gguf", "m.gguf")):
        assert convert(tmp_path / "ck", tmp_path / out, "--to", to, "--no-verify") == 0
        before = sorted(p.name for p in tmp_path.iterdir())
        assert convert(tmp_path / "ck", tmp_path / out, "--to", to, "--no-verify") == 2
        assert f"{tmp_path / out}: already exists and holds a model" in _err(capsys)
        assert sorted(p.name for p in tmp_path.iterdir()) == before
        assert convert(tmp_path / "ck", tmp_path / out, "--to", to, "--no-verify", "--overwrite") == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary names left behind"


def test_failed_verification_writes_nothing(tmp_path, tokenizer_path, monkeypatch, capsys):
    from megatrain.convert import verify
    from megatrain.model import build_model

    cfg = debug_config()
    make_checkpoint(tmp_path / "ck", cfg, tokenizer=tokenizer_path)
    wrong = build_model(cfg.model, seed=99).state_dict()
    monkeypatch.setattr(cli, "output_runner", lambda *a: verify.megatrain_runner(cfg.model, wrong))
    assert convert(tmp_path / "ck", tmp_path / "mt", "--to", "megatrain") == 1
    err = _err(capsys)
    assert "verification failed" in err and "nothing was written" in err and "diverge" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]

    def unreadable(*a):
        raise OSError("truncated file")

    monkeypatch.setattr(cli, "output_runner", unreadable)
    assert convert(tmp_path / "ck", tmp_path / "mt", "--to", "megatrain") == 1
    assert "does not load: OSError: truncated file" in _err(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_bad_arguments(tmp_path, capsys):
    make_checkpoint(tmp_path / "ck", debug_config())
    assert convert(tmp_path / "ck", tmp_path / "out", "--to", "hf", "--tp", "2") == 2
    assert "--tp / --pp apply to --to megatrain only" in _err(capsys)
    assert convert(tmp_path / "ck", tmp_path / "out", "--to", "megatrain", "--tp", "8", "--no-tokenizer") == 2
    assert "--tp 8 --pp 1 do not fit this model" in _err(capsys)
    assert convert(tmp_path / "ck", tmp_path / "out", "--to", "gguf", "--no-tokenizer") == 2
    assert "must carry the vocabulary" in _err(capsys)
    assert convert(tmp_path / "ck", tmp_path / "out", "--to", "hf", "--max-shard-size", "lots",
                   "--no-tokenizer") == 2
    assert "--max-shard-size 'lots'" in _err(capsys)
    assert convert(tmp_path / "ck", tmp_path / "out", "--to", "hf", "--atol", "-1", "--no-tokenizer") == 2
    assert "tolerances must be >= 0" in _err(capsys)
    (tmp_path / "file").write_text("x")
    assert convert(tmp_path / "ck", tmp_path / "file" / "out", "--to", "hf", "--no-tokenizer") == 2
    assert f"{tmp_path / 'file'} is a file, so nothing can be written under it" in _err(capsys)
