"""Fixtures for the checkpoint tests: a fork server for training runs, run arguments, result readers."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from tests.checkpoint.zygote import Zygote
from tests.tiny import tiny_run

STEPS = 10


@pytest.fixture(scope="session")
def zygote():
    with Zygote() as z:
        yield z


def run_args(data: str, run_dir: Path, *extra: str, steps: int = STEPS) -> list[str]:
    """A tiny deterministic run: debug model with dropout (so RNG state matters), fp32, a checkpoint per step."""
    return tiny_run(data, run_dir, steps, "model.dropout=0.1", "train.micro_batch_size=2", "train.deterministic=true",
                    "checkpoint.interval=1", "checkpoint.keep_last=0", "distributed.timeout_s=60", *extra)


def loss_records(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every step record in metrics.jsonl, in file order (re-run steps appear again)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by kill -9
        if "loss" in rec:
            out.append((rec["step"], rec["loss"]))
    return out


def wait_for_step(run_dir: Path, step: int, after: int, zygote: Zygote, pids: list[int], timeout: float = 120) -> None:
    """Until metrics.jsonl has a record of ``step`` or later beyond its first ``after`` records."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = loss_records(run_dir)[after:]
        if any(s >= step for s, _ in recs):
            return
        done = [p for p in pids if zygote.poll(p) is not None]
        if done:
            raise AssertionError(f"run {done} ended (rc {zygote.poll(done[0])}) before step {step}")
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached within {timeout} s")


def checkpoint_tensors(ckpt_dir: Path) -> dict:
    """Model and portable optimizer tensors of a checkpoint (safetensors: nothing is unpickled)."""
    from safetensors.torch import load_file

    out = {}
    for sub in ("model", "optim"):
        for f in sorted((Path(ckpt_dir) / sub).glob("*.safetensors")):
            out.update({f"{sub}/{f.name}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def assert_bitwise_equal(a: dict, b: dict) -> None:
    import torch

    assert sorted(a) == sorted(b)
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"tensors differ: {bad[:5]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict:
    return {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world,
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}


def start_ranks(zygote: Zygote, args: list[str], log: Path, world: int = 1, env_extra: dict | None = None) -> list[int]:
    """Start ``world`` ranks of one run (logs: ``log``, or ``log.rankN`` for several); returns their pids."""
    port = free_port()
    return [zygote.start(args, log=f"{log}.rank{r}" if world > 1 else log,
                         env={**(rank_env(r, world, port) if world > 1 else {}), **(env_extra or {})})
            for r in range(world)]


def run_to_end(zygote: Zygote, args: list[str], log: Path, world: int = 1, timeout: float = 180,
               env_extra: dict | None = None) -> list[int]:
    """Run ``world`` ranks to completion; returns their exit codes."""
    pids = start_ranks(zygote, args, log, world, env_extra)
    return [zygote.wait(p, timeout) for p in pids]


@pytest.fixture(scope="session")
def reference(zygote, pattern_dataset, tmp_path_factory):
    """One uninterrupted single-process run: {step: loss}, its run dir and final checkpoint tensors."""
    run = tmp_path_factory.mktemp("reference")
    rc = run_to_end(zygote, run_args(pattern_dataset, run, "checkpoint.keep_last=3"), run / "log")
    assert rc == [0], (run / "log").read_text()[-3000:]
    losses = dict(loss_records(run))
    assert sorted(losses) == list(range(1, STEPS + 1))
    return {"losses": losses, "dir": run,
            "final": checkpoint_tensors(run / "checkpoints" / f"step_{STEPS:08d}")}
