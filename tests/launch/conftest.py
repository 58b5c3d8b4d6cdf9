"""Shared helpers for launch tests against real services: Slurm, OpenMPI, launchers, namespaces.

A missing service skips the test on a developer machine but FAILS it under CI=true, where
.ci/setup_services.sh must have installed and started everything.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "tests" / "launch" / "dist_probe.py"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SETUP = "run `bash .ci/setup_services.sh` as root (installs and starts Slurm, munge and OpenMPI)"
# Variables that would make a launched process believe it is part of *our* job.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE")
_LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MV2_", "TORCHELASTIC_")


def require(what: str, ok: bool, how: str = SETUP) -> None:
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{what} is not available under CI=true: {how}", pytrace=False)
    pytest.skip(f"{what} is not available: {how}")


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith(_LAUNCH_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"  # two ranks share two cores
    env.update(extra)
    return env


def run(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a launcher; on timeout kill its process group and fail with the output so far."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env or clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[0]} did not finish within {timeout:.0f} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def excerpt(out: str, limit: int = 6000) -> str:
    """What a failure message should show: the first traceback (the root cause) and the tail."""
    first = out.find("Traceback")
    head = out[first:first + limit // 2] + "\n[...]\n" if first >= 0 else ""
    return head + out[-limit // 2:]


# The demo corpus and its sample indices, built once per test session in a private directory:
# other test runs on the same machine (or a stale ~/.cache) cannot interfere.
DATA_CACHE = Path(os.environ.get("MEGATRAIN_TEST_CACHE", "/tmp")) / f"megatrain-launch-tests-{os.getpid()}"


def debug_train_args(run_dir: Path, steps: int = 4, *extra: str) -> list[str]:
    """The debug model on the demo corpus for a few steps: seconds per run on CPU."""
    return ["model.preset=debug", "model.vocab_size=4096", f"data.cache_dir={DATA_CACHE}",
            f"train.max_steps={steps}", "train.seq_len=32",
            "train.micro_batch_size=2", "logging.interval=1", "eval.steps=1", "eval.sample_tokens=4",
            "distributed.timeout_s=120", "distributed.preflight_timeout_s=60", f"run.dir={run_dir}", *extra]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from RUN/metrics.jsonl (the last record per step wins, as after a resume)."""
    path = Path(run_dir) / "metrics.jsonl"
    assert path.is_file(), f"no {path}"
    losses = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "step" in rec:
            losses[rec["step"]] = rec["loss"]
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    return losses


def assert_same_losses(a: dict[int, float], b: dict[int, float], what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: different steps {sorted(a)} vs {sorted(b)}"
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=1e-5, abs_tol=1e-6), \
            f"{what}: step {step}: {a[step]} vs {b[step]}"


def _slurm_ready() -> bool:
    if not shutil.which("sbatch"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "allocated"))


@pytest.fixture(scope="session", autouse=True)
def _data_cache():
    yield
    shutil.rmtree(DATA_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm() -> None:
    require("a running Slurm cluster (sinfo shows no usable node)", _slurm_ready())


@pytest.fixture(scope="session")
def mpirun() -> str:
    path = shutil.which("mpirun")
    ok = bool(path) and subprocess.run([path, "--allow-run-as-root", "--version"], capture_output=True,
                                       timeout=30).returncode == 0
    require("OpenMPI's mpirun", ok)
    return path


@pytest.fixture(scope="session")
def torchrun_reference(tmp_path_factory) -> dict[int, float]:
    """Losses of the debug run under torchrun with 2 ranks: what every other launcher must reproduce."""
    run_dir = tmp_path_factory.mktemp("torchrun_ref")
    res = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port",
               str(free_port()), "-m", "megatrain.train", *debug_train_args(run_dir)], timeout=300)
    assert res.returncode == 0, excerpt(res.stdout)
    assert "found by torchrun" in res.stdout
    return train_losses(run_dir)


def free_port() -> int:
    from megatrain.launch.discover import free_port as _free

    return _free()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
