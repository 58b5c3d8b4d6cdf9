"""slurm/train.sbatch across two Slurm nodes, each its own network namespace with its own address.

tests/launch/netns_cluster.sh builds the cluster: namespaces mt<ID>a / mt<ID>b joined by a veth
pair (10.250.<ID>.1 and .2), a UTS namespace per node for its host name, slurmctld + slurmd on
node a and slurmd on node b. Rank 1 can reach rank 0 only over that link, so the rendezvous and
every all-reduce really cross hosts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.launch.conftest import (REPO, assert_same_losses, clean_env, debug_train_args, excerpt, require, run,
                                   train_losses)

CLUSTER = REPO / "tests" / "launch" / "netns_cluster.sh"


def _can_make_namespaces() -> bool:
    if os.geteuid() != 0 or not all(shutil.which(c) for c in ("ip", "nsenter", "unshare", "slurmd", "slurmctld")):
        return False
    probe = subprocess.run(["ip", "netns", "add", "mt-probe"], capture_output=True)
    subprocess.run(["ip", "netns", "del", "mt-probe"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    require("root with iproute2 network namespaces, util-linux and Slurm", _can_make_namespaces(),
            "run as root after `bash .ci/setup_services.sh`")
    state = tmp_path_factory.mktemp("netns_cluster")
    cluster_id = str(20 + os.getpid() % 200)  # names and subnet; distinct for concurrent test runs
    up = subprocess.run(["bash", CLUSTER, "up", state, cluster_id], capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, f"could not start the two-node cluster:\n{up.stdout}\n{up.stderr}"
        yield state, cluster_id
    finally:
        subprocess.run(["bash", CLUSTER, "down", state, cluster_id], capture_output=True, timeout=60)


@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
def test_train_sbatch_across_two_nodes(tmp_path, two_nodes, torchrun_reference, launcher):
    """srun: one task per rank, megatrain finds the master in the node list. deepspeed: one
    launcher per node with the generated hostfile, --no_ssh and its node rank."""
    state, cid = two_nodes
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    env = clean_env(MEGATRAIN_LOG_DIR=str(logs), MEGATRAIN_PYTHON=sys.executable, MEGATRAIN_LAUNCHER=launcher,
                    MEGATRAIN_PROCS_PER_NODE="1")
    res = run(["bash", CLUSTER, "run", state, cid, "sbatch", "--wait", "--nodes=2", "--ntasks-per-node=1",
               "--gpus-per-node=0", "--cpus-per-task=1", "--time=15", f"--output={tmp_path}/job-%j.out",
               REPO / "slurm" / "train.sbatch", *debug_train_args(run_dir)], timeout=400, env=env)
    job_logs = "\n".join(excerpt(p.read_text(), 3000) for p in [*tmp_path.glob("job-*.out"), *logs.glob("*.log")])
    assert res.returncode == 0, res.stdout + job_logs
    node_a, node_b = f"mt{cid}a", f"mt{cid}b"
    rank0 = (logs / ("rank-0.log" if launcher == "srun" else "node-0.log")).read_text()
    assert f"on 2 node(s): {node_a} {node_b}" in job_logs
    assert f"rank 0/2 (local 0/1) on {node_a}, master {node_a}:" in rank0
    found = "found by slurm: srun step" if launcher == "srun" else "variables set by the deepspeed launcher"
    assert found in rank0
    assert "preflight ok: 2 rank(s) on 2 host(s)" in rank0
    assert f"  {node_a}: ranks 0; cpu" in rank0 and f"  {node_b}: ranks 1; cpu" in rank0
    # Same data order and arithmetic as one box: two hosts must not change the numbers.
    assert_same_losses(train_losses(run_dir), torchrun_reference, "two Slurm nodes vs torchrun")
