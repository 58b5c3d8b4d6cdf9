"""torchrun, mpirun and the deepspeed launcher on one box, for real (CPU, gloo)."""

from __future__ import annotations

import sys
import time

from tests.launch.conftest import PROBE, assert_same_losses, debug_train_args, excerpt, free_port, run, train_losses

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]


def mpirun_cmd(mpirun: str) -> list:
    # --bind-to none: OpenMPI pins each rank to one core by default, which starves them when the
    # machine is busy; --oversubscribe: more ranks than cores is fine for these tiny runs.
    return [mpirun, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", "2", "-x", "PYTHONPATH"]


def test_rank_that_never_joins_ends_the_job_within_the_timeout(tmp_path):
    """Rank 1 sleeps for 2 minutes before init; distributed.timeout_s=4 must end the job long before."""
    t0 = time.monotonic()
    res = run([*TORCHRUN, "--master-port", free_port(), PROBE, "--out", tmp_path, "--timeout", "4",
               "--sleep-before-init", "1:120"], timeout=100)
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    assert "rank 1 of 2 did not join the rendezvous" in res.stdout, excerpt(res.stdout)
    assert "distributed.timeout_s=4s" in res.stdout
    assert elapsed < 40, f"the job took {elapsed:.0f} s (timeout 4 s + start-up)"
    assert not list(tmp_path.glob("rank*.json"))


def test_rank_that_hangs_after_joining_is_named_by_preflight(tmp_path):
    res = run([*TORCHRUN, "--master-port", free_port(), PROBE, "--out", tmp_path, "--timeout", "60",
               "--preflight-timeout", "3", "--sleep-before-preflight", "1:120"], timeout=100)
    assert res.returncode != 0
    assert "preflight all-reduce over gloo did not finish within distributed.preflight_timeout_s=3s: " \
           "rank 1 of 2 never reached it" in res.stdout, excerpt(res.stdout)


def test_mpirun_trains_and_matches_torchrun(tmp_path, mpirun, torchrun_reference):
    run_dir = tmp_path / "run"
    res = run([*mpirun_cmd(mpirun), "-x", "OMP_NUM_THREADS", sys.executable, "-m", "megatrain.train",
               *debug_train_args(run_dir)], timeout=300)
    assert res.returncode == 0, excerpt(res.stdout)
    assert "found by mpi: OpenMPI via mpi4py" in res.stdout
    assert "preflight ok: 2 rank(s) on 1 host(s)" in res.stdout
    assert_same_losses(train_losses(run_dir), torchrun_reference, "mpirun vs torchrun")


def test_mpirun_rank_that_never_starts_mpi_ends_the_job(tmp_path, mpirun):
    """MPI_Init waits for every rank with no timeout; megatrain's watchdog ends the wait."""
    t0 = time.monotonic()
    res = run([*mpirun_cmd(mpirun), sys.executable,
               PROBE, "--out", tmp_path, "--timeout", "4", "--sleep-before-init", "1:120"], timeout=100)
    assert res.returncode != 0
    assert "every rank must start MPI within distributed.timeout_s=4s" in res.stdout, excerpt(res.stdout)
    assert "Timeout (0:00:04)!" in res.stdout and "in _import_mpi" in res.stdout
    assert time.monotonic() - t0 < 40


def test_deepspeed_launcher_trains(tmp_path, torchrun_reference):
    run_dir = tmp_path / "run"
    res = run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", free_port(),
               "--module", "megatrain.train", *debug_train_args(run_dir)], timeout=300)
    assert res.returncode == 0, excerpt(res.stdout)
    assert "found by torchrun: variables set by the deepspeed launcher" in res.stdout
    losses = train_losses(run_dir)
    assert sorted(losses) == sorted(torchrun_reference)
    # The deepspeed launcher exports LOCAL_SIZE, which switches DeepSpeed's CPU all-reduce to its
    # shared-memory kernel: same numbers up to summation order.
    for step, loss in losses.items():
        assert abs(loss - torchrun_reference[step]) < 1e-3, (step, loss, torchrun_reference[step])
