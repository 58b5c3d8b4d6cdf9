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
    # declared ranges: each was accepted before and trained to garbage, looped or crashed mid-run
    (["train.loss_chunk_tokens=-5"], "train.loss_chunk_tokens"),
    (["train.max_wall_time=-10"], "train.max_wall_time"),
    (["logging.interval=0"], "logging.interval"),
    (["model.norm_eps=-1"], "model.norm_eps"),
    (["model.rope_theta=0"], "model.rope_theta"),
    (["model.dropout=1.5"], "model.dropout"),
    (["optimizer.lr=inf"], "optimizer.lr"),
    (["optimizer.lr=nan"], "optimizer.lr"),
    (["optimizer.beta1=1.5"], "optimizer.beta1"),
    (["optimizer.eps=-1"], "optimizer.eps"),
    (["optimizer.min_lr=1", "optimizer.lr=0.1"], "optimizer.min_lr"),
    (["schedule.warmup_steps=-5"], "schedule.warmup_steps"),
    (["schedule.wsd_decay_fraction=5"], "schedule.wsd_decay_fraction"),
    (["train.seed=-1"], "train.seed"),
    (["train.global_batch_size=-4"], "train.global_batch_size"),
    (["eval.top_p=2"], "eval.top_p"),
    (["checkpoint.keep_last=-1"], "checkpoint.keep_last"),
    (["distributed.timeout_s=-1"], "distributed.timeout_s"),
    (["model.rope_scaling={factor: -1}"], "model.rope_scaling.factor"),
    (["model.multiple_of=0", "model.ffn_hidden_size=null"], "model.multiple_of"),
    (["model.ffn_dim_multiplier=0.0001", "model.ffn_hidden_size=null"], "model.ffn_hidden_size"),
    (["parallel.activation_checkpoint_interval=-1"], "parallel.activation_checkpoint_interval"),
    (["parallel.pipeline_partition=bogus"], "parallel.pipeline_partition"),
    (["parallel.pipeline_partition=type:["], "parallel.pipeline_partition"),
    (["eval.prompts=[1]"], "eval.prompts"),
    (["logging.level=LOUD"], "logging.level"),
    (["model.preset=[x]"], "model.preset"),
    (["train.resume_allow_changes=[[1]]"], "train.resume_allow_changes"),
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


def test_config_file_that_is_not_text(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_bytes(b"\x00\x01\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(p)


def test_help_shows_ranges():
    from megatrain.config import describe_fields

    docs = dict((k, d) for k, _, d in describe_fields())
    assert docs["optimizer.beta2"].endswith("[in [0, 1)]") and docs["train.max_steps"].endswith("[in [1, 1000000000]]")


def test_key_written_twice_in_a_config_file(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model:\n  preset: debug\ntrain:\n  max_steps: 5\nmodel:\n  preset: demo\n")
    with pytest.raises(ConfigError, match=r"'model' appears twice in one mapping \(also line 1\)"):
        load_config(p)
    p.write_text("train:\n  max_steps: 5\n  seq_len: 16\n  max_steps: 6\n")
    with pytest.raises(ConfigError, match="'max_steps' appears twice"):
        load_config(p)


# --------------------------------------------------------------------------- issue 16: classes 7 and 8


def test_unreadable_config_file(tmp_path, monkeypatch):
    from pathlib import Path

    p = tmp_path / "run.yaml"
    p.write_text("train: {max_steps: 5}\n")

    def denied(self, *a, **k):  # the tests run as root, for whom chmod 000 does not deny reading
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError, match=r"--config .*run.yaml: cannot be read \(Permission denied\)"):
        load_config(p)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text", [
    "a: &a [x, x, x, x, x, x, x, x, x]\n" + BOMB + "eval: {prompts: *i}\n",  # 9**9 strings from 500 bytes
    "a: &a [x, x, x, x, x, x, x, x, x]\n" + BOMB,  # never used by the config: refused all the same
    "train: &t {resume_allow_changes: [*t]}\n",  # an alias inside itself
])
def test_yaml_alias_bombs_are_refused_quickly(tmp_path, text):
    import time

    p = tmp_path / "bomb.yaml"
    p.write_text(text)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="expands to more than 100,000 values|refers to the mapping or list"):
        load_config(p)
    assert time.monotonic() - t0 < 5


def test_yaml_anchors_of_normal_size_still_work(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model: {preset: debug}\neval:\n  prompts: &p [\"Hello, world\", c]\ndata: {split: \"9,1,0\"}\n")
    assert load_config(p).eval.prompts == ["Hello, world", "c"]


@pytest.mark.parametrize("override,field", [
    ("train.max_steps=1180591620717411303424", "train.max_steps"),  # 2**70
    ("train.max_steps=1000000001", "train.max_steps"),
    ("model.hidden_size=1099511627776", "model.hidden_size"),
    ("model.num_layers=100000", "model.num_layers"),
    ("model.vocab_size=4294967296", "model.vocab_size"),
    ("train.seq_len=1e12", "train.seq_len"),
    ("train.micro_batch_size=9007199254740993", "train.micro_batch_size"),
    ("train.global_batch_size=2147483648", "train.global_batch_size"),
    ("distributed.timeout_s=1e20", "distributed.timeout_s"),
    ("distributed.preflight_timeout_s=1e10", "distributed.preflight_timeout_s"),
    ("schedule.warmup_steps=10000000000", "schedule.warmup_steps"),
    ("checkpoint.keep_last=10000000000", "checkpoint.keep_last"),
    ("eval.sample_tokens=100000000", "eval.sample_tokens"),
    ("data.num_workers=100000", "data.num_workers"),
    ("parallel.tensor=1000000", "parallel.tensor"),
    ("train.max_wall_time=1e300", "train.max_wall_time"),
    ("train.seed=-1", "train.seed"),
])
def test_absurd_numbers_are_named(override, field):
    with pytest.raises(ConfigError, match=f"^{field.replace('.', '[.]')}[=:]"):
        load_config(None, ["model.preset=debug", override])


def test_a_plain_string_prompt_is_one_prompt(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text('eval:\n  prompts: "Hello, world"\n')
    assert load_config(p).eval.prompts == ["Hello, world"]
    assert load_config(None, ["eval.prompts=Hello, world"]).eval.prompts == ["Hello, world"]
    assert load_config(None, ["eval.prompts=[a, b]"]).eval.prompts == ["a", "b"]
    # names lists keep the comma form of the command line
    assert load_config(None, ["train.resume_allow_changes=data, model"]).train.resume_allow_changes == ["data", "model"]


@pytest.mark.parametrize("section", ["elasticity", "autotuning", "curriculum_learning", "data_efficiency",
                                     "activation_checkpointing"])
def test_deepspeed_template_features_megatrain_does_not_support(tmp_path, section):
    import json

    from megatrain.data.batch import plan_batch
    from megatrain.engine import build_ds_config

    t = tmp_path / "ds.json"
    t.write_text(json.dumps({section: {"enabled": True}, "zero_optimization": {"stage": 1}}))
    cfg = load_config(None, ["model.preset=debug", f"deepspeed.template={t}"])
    with pytest.raises(ConfigError, match=f"has the section '{section}', which megatrain does not support"):
        build_ds_config(cfg, plan_batch(cfg.train, 1))


def test_sample_index_too_large_for_memory_is_named(tmp_path):
    from megatrain.data.gpt_dataset import GPTDataset
    from megatrain.data.indexed import DataFormatError, IndexedDataset
    from tests.data.helpers import make_dataset

    ds = IndexedDataset(make_dataset(str(tmp_path / "d"), [[1] * 50] * 4))
    with pytest.raises(DataFormatError, match="sample index, more than half of this machine's"):
        GPTDataset(ds, (0, 4), seq_len=8, num_samples=10**9 * 2**20, seed=0, cache_dir=str(tmp_path))
