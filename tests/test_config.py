"""The config tree: loading, overrides, presets, round trips, and errors that name the field."""

import pytest

from megatrain.config import Config, ConfigError, PRESETS, load_config, validate_world
from megatrain.model import num_params


def test_yaml_then_overrides_then_preset(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  preset: tinyllama-1.1b\n  num_layers: 4\ntrain:\n  seq_len: 128\n")
    cfg = load_config(f, ["train.seq_len=64", "optimizer.lr=1e-4", "eval.prompts=[a, b]"])
    assert cfg.model.num_layers == 4  # the file's explicit value beats the preset
    assert cfg.model.hidden_size == 2048 and cfg.model.kv_heads == 4  # the rest comes from the preset
    assert cfg.train.seq_len == 64 and cfg.optimizer.lr == 1e-4 and cfg.eval.prompts == ["a", "b"]


def test_round_trip_and_stable_hash():
    cfg = load_config(None, ["model.preset=llama3.2-1b"])
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg and again.hash() == cfg.hash()
    assert load_config(None, ["model.preset=llama3.2-1b", "train.seed=2"]).hash() != cfg.hash()


def test_llama_ffn_rule():
    # LLaMA-2 7B: int(2/3 * 4 * 4096) = 10922 -> rounded up to a multiple of 256 = 11008
    cfg = load_config(None, ["model.hidden_size=4096", "model.num_heads=32", "model.ffn_hidden_size=null"])
    assert cfg.model.ffn_size == 11008


@pytest.mark.parametrize("name,published", [("llama2-7b", 6.74e9), ("llama3-8b", 8.03e9),
                                            ("tinyllama-1.1b", 1.10e9), ("llama2-13b", 13.0e9),
                                            ("llama3.2-1b", 1.24e9)])
def test_parameter_counts_match_published(name, published):
    n = num_params(load_config(None, [f"model.preset={name}"]).model)["total"]
    assert abs(n / published - 1) < 0.005


@pytest.mark.parametrize("overrides,field", [
    (["model.preset=nope"], "model.preset"),
    (["model.bogus=1"], "model.bogus"),
    (["bogus.x=1"], "bogus"),
    (["train.max_steps=ten"], "train.max_steps"),
    (["train.deterministic=maybe"], "train.deterministic"),
    (["model.hidden_size=100", "model.num_heads=8"], "model.hidden_size"),
    (["model.num_heads=8", "model.num_kv_heads=3"], "model.num_kv_heads"),
    (["model.num_heads=6", "model.num_kv_heads=6", "model.hidden_size=192", "parallel.tensor=4"], "model.num_heads"),
    (["model.num_heads=8", "model.num_kv_heads=2", "parallel.tensor=4"], "model.num_kv_heads"),
    (["model.num_layers=3", "parallel.pipeline=2"], "model.num_layers"),
    (["train.precision=fp8"], "train.precision"),
    (["parallel.pipeline=2", "deepspeed.zero_stage=3"], "deepspeed.zero_stage"),
    (["train.seq_len=4096", "model.max_seq_len=2048"], "train.seq_len"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_world_size_not_divisible():
    cfg = load_config(None, ["parallel.tensor=2", "parallel.pipeline=2"])
    with pytest.raises(ConfigError, match="world size 6"):
        validate_world(cfg, 6)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_all_presets_validate():
    for name in PRESETS:
        load_config(None, [f"model.preset={name}"])


def test_yaml_boolean_words_stay_words_for_string_fields():
    cfg = load_config(None, ["checkpoint.verify=off", "train.deterministic=on", "train.compile=no"])
    assert cfg.checkpoint.verify == "off" and cfg.train.deterministic is True and cfg.train.compile is False
