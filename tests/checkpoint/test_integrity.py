"""Damaged, partial and hostile checkpoints: each gives the documented behaviour and message
(docs/checkpoints.md, "What happens when"); mismatch guards; pruning."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import re
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatrain.checkpoint import compat, rng, save, select
from megatrain.checkpoint import layout
from megatrain.config import ConfigError, load_config
from tests.checkpoint.conftest import run_args, run_to_end

REPO = Path(__file__).resolve().parents[2]
TAGS = [layout.tag_for_step(s) for s in (1, 2, 3)]


@pytest.fixture(scope="module")
def pristine(zygote, pattern_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("pristine")
    assert run_to_end(zygote, run_args(pattern_dataset, run, steps=3), run / "log") == [0]
    return run


@pytest.fixture
def root(pristine, tmp_path):
    """A private copy of the pristine checkpoints directory (step_1..3, latest -> step_3)."""
    dst = tmp_path / "checkpoints"
    shutil.copytree(pristine / "checkpoints", dst)
    return dst


def _select(mode, root, verify="sizes"):
    return select.select_checkpoint(mode, root, verify)


def _shard(root: Path, tag: str = TAGS[-1]) -> Path:
    return root / tag / "model" / "tp00_pp00.safetensors"


def _reseal(ckpt_dir: Path, rel: str) -> None:
    """Update the manifest entry of ``rel`` as a forger who also rewrites the manifest would."""
    manifest = json.loads((ckpt_dir / layout.MANIFEST).read_text())
    data = (ckpt_dir / rel).read_bytes()
    manifest["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt_dir / layout.MANIFEST).write_text(json.dumps(manifest))


# --------------------------------------------------------------------------- damaged files


def test_flipped_byte_is_found_by_full_verification_and_auto_falls_back(root, caplog):
    shard = _shard(root)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert _select("auto", root, "sizes") == root / TAGS[-1]  # same size: only hashing can tell
    with caplog.at_level(logging.WARNING, "megatrain"):
        assert _select("auto", root, "full") == root / TAGS[-2]
    assert f"{shard}: SHA-256 differs from manifest.json" in caplog.text and "trying the previous one" in caplog.text
    with pytest.raises(layout.CheckpointError, match="SHA-256 differs"):
        _select(str(root / TAGS[-1]), root, "full")


def test_truncated_shard(root):
    shard = _shard(root)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(layout.CheckpointError, match=r"tp00_pp00.safetensors: \d+ bytes, the manifest says \d+"):
        _select(str(root / TAGS[-1]), root)
    assert _select("auto", root) == root / TAGS[-2]


def test_missing_shard(root):
    _shard(root).unlink()
    with pytest.raises(layout.CheckpointError, match="tp00_pp00.safetensors: listed in manifest.json but missing"):
        _select(str(root / TAGS[-1]), root)


def test_file_not_in_manifest_is_refused(root):
    (root / TAGS[-1] / "ds" / "state" / "extra.pt").write_bytes(b"x")
    with pytest.raises(layout.CheckpointError, match="extra.pt: not listed in manifest.json"):
        _select(str(root / TAGS[-1]), root)


def test_missing_latest_uses_newest_complete(root, caplog):
    (root / "latest").unlink()
    with caplog.at_level(logging.WARNING, "megatrain"):
        assert _select("auto", root) == root / TAGS[-1]
    assert "latest is missing; using the newest complete checkpoint step_00000003" in caplog.text


def test_latest_pointing_at_partial_checkpoint(root, caplog):
    (root / TAGS[-1] / layout.COMPLETE).unlink()
    with caplog.at_level(logging.WARNING, "megatrain"):
        assert _select("auto", root) == root / TAGS[-2]
    assert "names step_00000003, which is missing or incomplete; using the newest complete" in caplog.text
    with pytest.raises(layout.CheckpointError, match="partial checkpoint"):
        _select(str(root / TAGS[-1]), root)


def test_newer_complete_checkpoint_than_latest_wins(root, caplog):
    (root / "latest").write_text(TAGS[0] + "\n")  # a save died between its rename and moving latest
    with caplog.at_level(logging.WARNING, "megatrain"):
        assert _select("auto", root) == root / TAGS[-1]
    assert "complete but older" in caplog.text


@pytest.mark.parametrize("latest", [TAGS[0], layout.tag_for_step(9)], ids=["older-complete", "missing-step"])
def test_training_and_conversion_pick_the_same_checkpoint_when_latest_is_stale(root, latest, caplog):
    """One rule for both: the newest complete checkpoint that verifies; `latest` is only a hint."""
    from megatrain.convert.source import load_source

    (root / "latest").write_text(latest + "\n")
    with caplog.at_level(logging.WARNING, "megatrain"):
        trained_from = _select("auto", root)  # what megatrain-train's auto-resume loads
        converted_from = load_source(root.parent).path  # what megatrain-convert RUN_DIR reads
    assert trained_from == converted_from == root / TAGS[-1]
    assert f"names {latest}" in caplog.text  # the disagreement is logged, not silent


def test_nothing_usable_is_an_error_never_a_fresh_start(root, tmp_path):
    for tag in TAGS:
        _shard(root, tag).unlink()
    with pytest.raises(layout.CheckpointError, match="no usable checkpoint .* train.resume=never"):
        _select("auto", root)
    assert _select("auto", tmp_path / "nothing-here") is None  # nothing was ever saved: a fresh start
    with pytest.raises(layout.CheckpointError, match="no such file"):
        _select(str(tmp_path / "nothing-here"), root)


def test_damaged_checkpoint_in_a_real_run(zygote, pattern_dataset, root, tmp_path):
    shard = _shard(root)
    shard.write_bytes(shard.read_bytes()[:-10])
    run = root.parent
    # resume=PATH to it: a one-line error naming the file, exit code 2.
    log = tmp_path / "explicit.log"
    args = run_args(pattern_dataset, run, f"train.resume={root / TAGS[-1]}", steps=3)
    assert run_to_end(zygote, args, log) == [2]
    assert f"error: {shard}: " in log.read_text()
    # resume=auto: reports it, falls back to step 2 and trains on.
    log = tmp_path / "auto.log"
    assert run_to_end(zygote, run_args(pattern_dataset, run, steps=3), log) == [0]
    text = log.read_text()
    assert "step_00000003 is unusable" in text and "resumed from" in text and "step_00000002: step 2" in text


# --------------------------------------------------------------------------- hostile pickles


class _Payload:
    marker = ""

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def _evil_file(path: Path, marker: Path) -> None:
    _Payload.marker = str(marker)
    torch.save({"state": _Payload()}, path)


@pytest.mark.parametrize("rel", ["rng/rank00000.pt", "ds/state/mp_rank_00_model_states.pt",
                                 "ds/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_pickle_that_runs_code_is_refused(root, tmp_path, rel):
    marker = tmp_path / "pwned"
    target = root / TAGS[-1]
    _evil_file(target / rel, marker)
    _reseal(target, rel)  # even with a manifest that matches
    with pytest.raises(layout.CheckpointError, match=r"refers to builtins\.exec, which is code"):
        _select(str(target), root, "full")
    with _quiet():
        assert _select("auto", root, "full") == root / TAGS[-2]
    # The second line of defence, should a file ever get past the scan: every torch.load is weights-only.
    with pytest.raises(layout.CheckpointError, match="not a plain-data RNG state"):
        rng.load_rng_file(target / rel)
    with select.weights_only_unpickling(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(target / rel, weights_only=False)  # what DeepSpeed's loader asks for
    assert not marker.exists(), "the payload ran"


@contextlib.contextmanager
def _quiet():
    """Silence megatrain's fallback warnings for a moment."""
    logging.getLogger("megatrain").disabled = True
    try:
        yield
    finally:
        logging.getLogger("megatrain").disabled = False


def test_hostile_checkpoint_in_a_real_run(zygote, pattern_dataset, root, tmp_path):
    marker = tmp_path / "pwned"
    target = root / TAGS[-1]
    rel = "ds/state/mp_rank_00_model_states.pt"
    _evil_file(target / rel, marker)
    _reseal(target, rel)
    log = tmp_path / "log"
    args = run_args(pattern_dataset, root.parent, f"train.resume={target}", 'checkpoint.verify="off"', steps=3)
    assert run_to_end(zygote, args, log) == [2]
    assert "which is code, not data" in log.read_text()
    assert not marker.exists(), "the payload ran"


def test_megatrain_never_calls_torch_load_without_weights_only():
    offenders = []
    for path in (REPO / "megatrain").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


# --------------------------------------------------------------------------- guards and pruning


def _trainer_like(pristine: Path, *overrides: str) -> tuple:
    meta = layout.read_meta(pristine / "checkpoints" / TAGS[-1])
    cfg = load_config(None, [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}"
                             for k, v in _flat(meta["config"]).items()] + list(overrides))
    tr = SimpleNamespace(cfg=cfg, fingerprints={"data": meta["data_fingerprint"], "tokenizer": None})
    return tr, meta


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "rope_scaling":
            out.update(_flat(v, f"{prefix}{k}."))
        elif v is not None:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("override, item, words", [
    ("model.rope_theta=500000", "model", "model.rope_theta 10000.0 -> 500000.0"),
    ("train.seq_len=16", "data", "train.seq_len 32 -> 16"),
    ("optimizer.lr=1e-3", "schedule", "optimizer.lr 0.003 -> 0.001"),
])
def test_mismatch_is_refused_naming_the_change_unless_allowed(pristine, override, item, words, caplog):
    tr, meta = _trainer_like(pristine, override)
    with pytest.raises(ConfigError, match=rf"{words}.*train.resume_allow_changes=\[{item}\]"):
        compat.check_compatible(tr.cfg, tr.fingerprints, meta, Path("ckpt"))
    tr, meta = _trainer_like(pristine, override, f"train.resume_allow_changes=[{item}]")
    with caplog.at_level(logging.WARNING, "megatrain"):
        compat.check_compatible(tr.cfg, tr.fingerprints, meta, Path("ckpt"))
    assert words in caplog.text
    tr, _ = _trainer_like(pristine)
    compat.check_compatible(tr.cfg, tr.fingerprints, meta, Path("ckpt"))  # unchanged: no complaint
    tr.fingerprints["data"] = "0" * 16
    with pytest.raises(ConfigError, match="data fingerprint"):
        compat.check_compatible(tr.cfg, tr.fingerprints, meta, Path("ckpt"))


@pytest.mark.parametrize("override, words", [
    ("model.hidden_size=128", "blocks.0.attn.o.weight (64, 64) -> (128, 128)"),
    ("model.num_layers=4", "blocks.2.attn.qkv.weight only in this run"),
])
def test_shape_change_is_refused_even_when_model_changes_are_allowed(pristine, override, words):
    tr, meta = _trainer_like(pristine, override)
    with pytest.raises(ConfigError, match=r"model shape.*train.resume_allow_changes=\[model\]"):
        compat.check_compatible(tr.cfg, tr.fingerprints, meta, Path("ckpt"))
    tr, meta = _trainer_like(pristine, override, "train.resume_allow_changes=[model]")
    with pytest.raises(ConfigError, match=rf"other shapes than this run's model \(.*{re.escape(words)}"):
        compat.check_compatible(tr.cfg, tr.fingerprints, meta, Path("ckpt"))


def test_prune_keeps_last_n_and_every_kth(tmp_path):
    for s in range(1, 13):
        d = tmp_path / layout.tag_for_step(s)
        d.mkdir()
        layout.mark_complete(d)
    (tmp_path / layout.tag_for_step(13)).mkdir()  # an interrupted save: not counted, not deleted
    save.prune(tmp_path, keep_last=3, keep_every=5)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [layout.tag_for_step(s) for s in (5, 10, 11, 12, 13)]
