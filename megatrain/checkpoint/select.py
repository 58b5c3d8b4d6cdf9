"""Which checkpoint to use, and whether it may be loaded: one rule for training and conversion.

The rule: **the newest complete checkpoint that verifies**. ``latest`` is a hint, written after
every save; when it disagrees with the rule (it names an older step, or a step that is missing or
incomplete) that is logged, and the rule wins. ``megatrain-train`` (auto-resume) and
``megatrain-convert`` both call :func:`find_checkpoint`, so they always pick the same directory.

Verification runs before any file is unpickled: the ``COMPLETE`` marker, a readable ``meta.json``,
the manifest (sizes, or SHA-256 with ``full``), no file the manifest does not list, and a static scan
of every torch pickle for references to code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from megatrain.checkpoint import layout
from megatrain.checkpoint.layout import CheckpointError
from megatrain.engine.internals import checkpoint_safe_globals

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def verify_checkpoint(path: Path, level: str) -> dict:
    """Everything that is checked before any file of ``path`` is unpickled; returns its meta.

    Raises CheckpointError naming the file: no COMPLETE, unreadable meta, manifest mismatch (sizes, or
    SHA-256 with ``full``), a file the manifest does not list, pickled code in DeepSpeed's files."""
    if not layout.is_complete(path):
        raise CheckpointError(f"{path}: partial checkpoint (no {layout.COMPLETE} marker: the save was interrupted); "
                              f"use another one")
    meta = layout.read_meta(path)
    if level != "off":
        layout.verify_manifest(path, level)
        listed = set(json.loads((path / layout.MANIFEST).read_text())["files"])
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = f.relative_to(path).as_posix()
            if rel not in listed and rel not in (layout.MANIFEST, layout.COMPLETE):
                raise CheckpointError(f"{f}: not listed in {layout.MANIFEST} (added after the save?); remove it or "
                                      f"use another checkpoint")
    scan_pickles(path)
    return meta


def scan_pickles(path: Path) -> None:
    """Refuse a checkpoint whose torch files reference any code beyond torch's and DeepSpeed's data classes
    (a static scan of the pickle opcodes: nothing is executed)."""
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        for f in sorted(path.rglob("*.pt")):
            try:
                bad = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
            except Exception as e:  # noqa: BLE001 - not a zip torch file: weights_only loading refuses it anyway
                raise CheckpointError(f"{f}: not a readable torch checkpoint file ({e}); use another "
                                      f"checkpoint") from None
            if bad:
                raise CheckpointError(f"{f}: refers to {', '.join(bad[:3])}, which is code, not data; this file was "
                                      f"not written by megatrain/DeepSpeed and is not loaded (checkpoints must come "
                                      f"from a trusted place)")


@contextlib.contextmanager
def weights_only_unpickling() -> Iterator[None]:
    """Within the block every ``torch.load`` (DeepSpeed's included) runs with ``weights_only=True`` and
    DeepSpeed's data classes allowed."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ[keys[0]] = "1"
    os.environ.pop(keys[1], None)
    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals()):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def candidates(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, newest first (the order the rule tries them), saying why
    when ``latest`` disagrees."""
    done = list(reversed(layout.list_checkpoints(root)))
    latest_file = root / layout.LATEST
    named = latest_file.read_text(errors="replace").strip() if latest_file.is_file() else None
    if not done:
        if named or layout.list_checkpoints(root, complete_only=False):
            log.warning("%s: no complete checkpoint (every step_* directory lacks %s: interrupted saves)", root,
                        layout.COMPLETE)
        return []
    if named is None:
        log.warning("%s is missing; using the newest complete checkpoint %s", latest_file, done[0].name)
    elif named != done[0].name:
        state = "complete but older" if layout.is_complete(root / named) else "missing or incomplete"
        log.warning("%s names %s, which is %s; using the newest complete checkpoint %s", latest_file, named, state,
                    done[0].name)
    return done


def find_checkpoint(root: PathLike, verify: str, what: str = "") -> Optional[Path]:
    """The rule: the newest complete checkpoint under ``root`` that verifies at ``verify``; a damaged one
    is reported and the next older one tried. None when there is no complete checkpoint at all;
    CheckpointError when there are some and every one is damaged."""
    root = Path(root)
    tried = []
    for cand in candidates(root):
        try:
            verify_checkpoint(cand, verify)
            return cand
        except CheckpointError as e:
            log.warning("checkpoint %s is unusable: %s; trying the previous one", cand.name, e)
            tried.append(str(e))
    if tried:
        raise CheckpointError(f"{what or root}: no usable checkpoint under {root}; every complete one is "
                              f"damaged (newest: {tried[0]}). Restore one, or start over deliberately with "
                              f"train.resume=never")
    return None


def checkpoints_root(path: Path) -> Path:
    """RUN_DIR or RUN_DIR/checkpoints -> the directory holding step_* directories."""
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def is_step_dir(path: Path) -> bool:
    return layout.step_of_tag(path.name) is not None or (path / layout.META).is_file()


def select_checkpoint(mode: str, root: Path, verify: str) -> Optional[Path]:
    """The checkpoint ``train.resume=mode`` means (verified), None to start fresh; CheckpointError otherwise.

    auto: :func:`find_checkpoint` under ``root``; none at all: start fresh. PATH: a step directory (must
    verify), or a checkpoints / run directory (as auto, but an error when nothing is there)."""
    if mode == "never":
        return None
    if mode != "auto":
        path = Path(mode)
        if not path.exists():
            raise CheckpointError(f"train.resume={mode}: no such file or directory")
        if is_step_dir(path):
            verify_checkpoint(path, verify)
            return path
        root = checkpoints_root(path)
    found = find_checkpoint(root, verify, what=f"train.resume={mode}")
    if found is None and mode != "auto":
        raise CheckpointError(f"train.resume={mode}: holds no complete checkpoint")
    if found is None:
        log.info("train.resume=auto: no checkpoint under %s; starting from scratch", root)
    return found


def resolve_checkpoint_dir(path: PathLike, verify: str = "sizes") -> Path:
    """The checkpoint a tool means by ``path``: a step directory itself, or for a checkpoints root or a
    run directory the one :func:`find_checkpoint` picks (the same one training would resume from)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass a checkpoint directory (RUN_DIR/checkpoints/step_N), "
                              f"a checkpoints directory or a run directory")
    if (path / layout.META).is_file() or layout.is_complete(path) or (path / layout.MODEL_DIR).is_dir():
        return path
    for root in (path, path / "checkpoints"):
        if (root / layout.LATEST).is_file() or layout.list_checkpoints(root, complete_only=False):
            found = find_checkpoint(root, verify)
            if found is None:
                raise CheckpointError(f"{root}: holds no complete checkpoint (every step_* directory lacks "
                                      f"{layout.COMPLETE}: the saves were interrupted)")
            return found
    raise CheckpointError(f"{path}: not a megatrain checkpoint (no {layout.META}, no {layout.LATEST}, no step_* "
                          f"directories); pass RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/step_N")
