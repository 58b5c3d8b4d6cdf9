"""The checkpoint file layout: names, atomicity, manifest integrity, completion and discovery."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open

from megatrain.checkpoint import layout
from megatrain.checkpoint.select import find_checkpoint, resolve_checkpoint_dir
from megatrain.parallel.layers import shard_of
from tests.convert.conftest import debug_config, make_checkpoint


def test_names():
    assert layout.tag_for_step(100) == "step_00000100"
    assert layout.step_of_tag("step_00000100") == 100 and layout.step_of_tag("latest") is None
    assert layout.shard_path("/c", 1, 0).as_posix() == "/c/model/tp01_pp00.safetensors"
    with pytest.raises(ValueError):
        layout.tag_for_step(-1)


def _trainer_style_save(root, cfg, sd, tp, pp, step):
    """Write a checkpoint the way the trainer does: one shard per rank, then meta, manifest, COMPLETE, latest."""
    tag = layout.tag_for_step(step)
    stage_of = layout.stage_of_names(sd, cfg.model.num_layers, pp)
    dims = {n: d for n, (_, d) in layout.model_layout(cfg.model).items()}
    for t in range(tp):  # cut with the TP layers' own rule, independently of split_for_topology
        for p in range(pp):
            shard = {n: shard_of(x, dims[n], t, tp).contiguous() for n, x in sd.items() if stage_of[n] == p}
            layout.write_model_shard(root / tag, t, p, shard, tp, pp)
    meta = layout.build_weights_only_meta(cfg.to_dict(), sd, tp, pp, {"step": step, "weights_only": False})
    layout.write_meta(root / tag, meta)
    layout.write_manifest(root / tag)
    layout.mark_complete(root / tag)
    layout.update_latest(root, tag)
    return root / tag


def test_shards_round_trip_bitwise_at_tp2_pp2(tmp_path):
    cfg = debug_config()
    sd = make_checkpoint(tmp_path / "a", cfg, tp=2, pp=2)
    # the trainer's path (per-rank shards + write_model_shard) writes the same files as the one-call writer
    _trainer_style_save(tmp_path / "run", cfg, sd, 2, 2, 7)
    for t in range(2):
        for p in range(2):
            with safe_open(str(layout.shard_path(tmp_path / "a", t, p)), "pt") as f:
                assert f.metadata()["tp_rank"] == str(t) and f.metadata()["pp"] == "2"
                with safe_open(str(layout.shard_path(tmp_path / "run" / "step_00000007", t, p)), "pt") as g:
                    assert set(f.keys()) == set(g.keys())
                    assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
    meta, full = layout.load_canonical_weights(tmp_path / "a", verify="full")
    assert meta["topology"]["tp"] == 2 and meta["weights_only"] is True and meta["format"] == layout.FORMAT
    assert set(full) == set(sd) and all(torch.equal(full[k], sd[k]) for k in sd)
    assert not list(tmp_path.glob(".*tmp*")), "temporary names left behind"


def test_tied_embedding_is_stored_once(tmp_path):
    cfg = debug_config("model.tie_embeddings=true")
    sd = make_checkpoint(tmp_path / "c", cfg, tp=2, pp=2)
    holders = [p.name for p in sorted((tmp_path / "c" / "model").iterdir())
               if "embed.embed.weight" in safe_open(str(p), "pt").keys()]
    assert holders == ["tp00_pp00.safetensors", "tp01_pp00.safetensors"]
    assert "head.proj.weight" not in sd
    _, full = layout.load_canonical_weights(tmp_path / "c")
    assert torch.equal(full["embed.embed.weight"], sd["embed.embed.weight"])


def test_load_weights_for_rank_recuts_for_another_tp(tmp_path):
    cfg = debug_config("model.num_kv_heads=4")  # 4 KV heads: TP=4 can split them
    sd = make_checkpoint(tmp_path / "c", cfg, tp=2)
    dims = {n: d for n, (_, d) in layout.model_layout(cfg.model).items()}
    for rank in range(4):
        _, mine = layout.load_weights_for_rank(tmp_path / "c", rank, 4)
        for n, t in mine.items():
            want = sd[n].chunk(4, dim=dims[n])[rank] if dims[n] is not None else sd[n]
            assert torch.equal(t, want), n
    with pytest.raises(layout.CheckpointError, match="not divisible by tp=8"):
        layout.load_weights_for_rank(tmp_path / "c", 0, 8)


def test_manifest_levels_name_the_bad_file(tmp_path):
    make_checkpoint(tmp_path / "c", debug_config(), tp=2)
    shard = layout.shard_path(tmp_path / "c", 1, 0)
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(blob))
    layout.verify_manifest(tmp_path / "c", "sizes")
    layout.verify_manifest(tmp_path / "c", "off")
    with pytest.raises(layout.CheckpointError, match="tp01_pp00.safetensors: SHA-256"):
        layout.verify_manifest(tmp_path / "c", "full")
    shard.write_bytes(bytes(blob[:-10]))
    with pytest.raises(layout.CheckpointError, match="tp01_pp00.safetensors: .* truncated"):
        layout.load_canonical_weights(tmp_path / "c", verify="sizes")
    shard.unlink()
    with pytest.raises(layout.CheckpointError, match="tp01_pp00.safetensors: listed in manifest.json but missing"):
        layout.verify_manifest(tmp_path / "c", "sizes")
    with pytest.raises(layout.CheckpointError, match="missing shard"):
        layout.load_canonical_weights(tmp_path / "c", verify="off")


def test_partial_checkpoint_is_never_loaded(tmp_path):
    make_checkpoint(tmp_path / "c", debug_config())
    (tmp_path / "c" / layout.COMPLETE).unlink()
    assert not layout.is_complete(tmp_path / "c")
    with pytest.raises(layout.CheckpointError, match="partial checkpoint"):
        layout.load_canonical_weights(tmp_path / "c")


def test_find_resume_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    cfg = debug_config()
    root = tmp_path / "checkpoints"
    assert find_checkpoint(root, verify="off") is None
    sd = make_checkpoint(root / "step_00000001", cfg)
    _trainer_style_save(root, cfg, sd, 1, 1, 2)
    assert find_checkpoint(root, verify="off") == root / "step_00000002"
    assert layout.list_checkpoints(root) == [root / "step_00000001", root / "step_00000002"]
    (root / "step_00000002" / layout.COMPLETE).unlink()  # latest now names an interrupted save
    with caplog.at_level(logging.WARNING, logger="megatrain.checkpoint.select"):
        assert find_checkpoint(root, verify="off") == root / "step_00000001"
    assert "step_00000002" in caplog.text and "newest complete checkpoint" in caplog.text
    with pytest.raises(layout.CheckpointError, match="not a complete checkpoint"):
        layout.update_latest(root, "step_00000002")
    # a run directory or checkpoints root resolves to the checkpoint to use
    assert resolve_checkpoint_dir(tmp_path, verify="off") == root / "step_00000001"


def test_whole_directory_writes_are_atomic_and_refuse_to_overwrite(tmp_path):
    cfg = debug_config()
    sd = make_checkpoint(tmp_path / "c", cfg)
    with pytest.raises(layout.CheckpointError, match="already exists"):
        layout.write_weights_only_checkpoint(tmp_path / "c", cfg.to_dict(), sd)
    bad = dict(sd)
    bad.pop("norm.weight")
    with pytest.raises(layout.CheckpointError, match="norm.weight"):
        layout.write_weights_only_checkpoint(tmp_path / "d", cfg.to_dict(), bad)
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d*")), "a failed write left files behind"
    layout.write_weights_only_checkpoint(tmp_path / "c", cfg.to_dict(), sd, tp=2, overwrite=True)
    assert layout.read_meta(tmp_path / "c")["topology"]["tp"] == 2


def test_meta_and_shard_headers_are_checked(tmp_path):
    cfg = debug_config()
    make_checkpoint(tmp_path / "c", cfg, tp=2)
    meta_path = tmp_path / "c" / layout.META
    meta = json.loads(meta_path.read_text())
    meta["topology"]["tp"] = 1  # meta says TP=1 while two TP files are present
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(layout.CheckpointError, match="outside the topology"):
        layout.load_canonical_weights(tmp_path / "c", verify="off")
    meta["format"] = "something-else"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(layout.CheckpointError, match="not a megatrain checkpoint"):
        layout.read_meta(tmp_path / "c")
    with pytest.raises(layout.CheckpointError, match="no meta.json"):
        layout.read_meta(tmp_path)


def test_replicated_copies_must_agree(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    make_checkpoint(tmp_path / "c", debug_config(), tp=2)
    path = layout.shard_path(tmp_path / "c", 1, 0)
    sd = load_file(str(path))
    base = sd["norm.weight"].clone()
    for delta, ok in ((1e-7, True), (0.5, False)):
        sd["norm.weight"] = base + delta  # replicated on every TP rank
        save_file(sd, str(path), metadata={"tp_rank": "1", "pp_rank": "0", "tp": "2", "pp": "1"})
        if ok:
            with caplog.at_level(logging.WARNING, logger="megatrain.checkpoint.layout"):
                _, full = layout.load_canonical_weights(tmp_path / "c", verify="off")
            assert torch.equal(full["norm.weight"], base) and "replicated copies differ" in caplog.text
        else:
            with pytest.raises(layout.CheckpointError, match="norm.weight: replicated tensor differs"):
                layout.load_canonical_weights(tmp_path / "c", verify="off")
