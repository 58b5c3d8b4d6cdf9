"""Launch discovery, rendezvous and preflight in one process (fast; no launcher needed).

Real launches (torchrun, srun, mpirun, the deepspeed launcher, two Slurm nodes) are in tests/launch/.
"""

from __future__ import annotations

import builtins
import logging
import os
import socket
import time

import pytest

from megatrain.launch import discover as D
from megatrain.launch import preflight as P
from megatrain.launch import rendezvous as R
from megatrain.launch import text as T
from megatrain.config import ConfigError, DistributedConfig
from megatrain.launch.discover import LaunchError, discover_launch, expand_hostlist, expand_tasks_per_node

HOST = socket.gethostname()


def torchrun_env(rank=0, world=2, **extra):
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "abc"}
    env.update(extra)
    return env


def srun_env(procid=0, ntasks=2, nodelist="vm", per_node="2", nodeid=0, localid=None, **extra):
    env = {"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks),
           "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_LOCALID": str(procid if localid is None else localid),
           "SLURM_NODEID": str(nodeid), "SLURM_STEP_NODELIST": nodelist, "SLURM_JOB_NODELIST": nodelist,
           "SLURM_STEP_TASKS_PER_NODE": per_node, "SLURMD_NODENAME": "vm"}
    env.update(extra)
    return env


@pytest.fixture
def clean_env():
    """init_distributed writes os.environ; give it a launcher-free one and restore it afterwards."""
    saved = dict(os.environ)
    for k in list(os.environ):
        if k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "MV2_", "TORCHELASTIC_")) or k in (
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                "CROSS_RANK", "LOCAL_SIZE"):
            del os.environ[k]
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, hosts", [
    ("vm", ["vm"]),
    ("a,b", ["a", "b"]),
    ("gpu[01-03,7]", ["gpu01", "gpu02", "gpu03", "gpu7"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("login-a[1-2]-x,z", ["login-a1-x", "login-a2-x", "z"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu[a-b]"])
def test_expand_hostlist_rejects_garbage(bad):
    with pytest.raises(LaunchError, match="host list"):
        expand_hostlist(bad)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(LaunchError, match="tasks-per-node"):
        expand_tasks_per_node("2(3)")


def test_ranges():
    assert T.ranges([5, 0, 1, 2, 9, 10]) == "0-2,5,9-10"
    assert T.rank_list([3]) == "rank 3" and T.rank_list([1, 2]) == "ranks 1-2"


# --------------------------------------------------------------------------- discovery


def test_torchrun():
    info = discover_launch(torchrun_env(rank=1))
    assert (info.method, info.rank, info.local_rank, info.world_size, info.local_world_size) == ("torchrun", 1, 1, 2, 2)
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 29500)
    assert "torchrun" in info.describe()


def test_deepspeed_launcher():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
           "CROSS_SIZE": "2", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    info = discover_launch(env)
    assert (info.method, info.rank, info.local_rank, info.local_world_size) == ("torchrun", 3, 1, 2)
    assert "deepspeed" in info.source


def test_torchrun_one_launcher_per_node_inside_srun_is_fine():
    env = torchrun_env(rank=3, world=4, LOCAL_RANK="1")
    env.update(srun_env(procid=1, ntasks=2, nodelist="n[1-2]", per_node="1(x2)", nodeid=1))
    env["SLURM_STEP_NUM_NODES"] = "2"
    assert discover_launch(env).rank == 3


def test_slurm_one_node():
    info = discover_launch(srun_env(procid=1))
    assert (info.method, info.rank, info.local_rank, info.world_size, info.local_world_size) == ("slurm", 1, 1, 2, 2)
    assert info.master_addr == "127.0.0.1"  # one node: loopback, no name resolution needed
    assert info.master_port == 10000 + 1234 and info.hostname == "vm"


def test_slurm_two_nodes_uneven():
    env = srun_env(procid=4, ntasks=5, nodelist="gpu[07-08]", per_node="4,1", nodeid=1, localid=0)
    info = discover_launch(env)
    assert (info.rank, info.local_rank, info.world_size, info.local_world_size) == (4, 0, 5, 1)
    assert info.master_addr == "gpu07"


def test_slurm_respects_master_overrides():
    info = discover_launch(srun_env(nodelist="a,b", per_node="1(x2)", MASTER_ADDR="10.1.1.1", MASTER_PORT="4242"))
    assert (info.master_addr, info.master_port) == ("10.1.1.1", 4242)


def test_single_process(caplog):
    info = discover_launch({})
    assert (info.method, info.rank, info.world_size, info.master_addr) == ("single", 0, 1, "127.0.0.1")
    with caplog.at_level(logging.WARNING, logger="megatrain.launch"):
        discover_launch({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"})  # batch shell, no srun
    assert "not started by srun" in caplog.text


def test_plain_rank_variables_without_launcher():
    info = discover_launch({"RANK": "0", "WORLD_SIZE": "1"})
    assert (info.method, info.world_size, info.master_port) == ("torchrun", 1, 0)


# --------------------------------------------------------------------------- inconsistent environments


@pytest.mark.parametrize("env, words", [
    (torchrun_env(rank=2, world=2), ["RANK=2", "0..1", "WORLD_SIZE=2"]),
    (torchrun_env(rank=0, world=0), ["WORLD_SIZE=0"]),
    ({k: v for k, v in torchrun_env().items() if k != "MASTER_ADDR"}, ["MASTER_ADDR is not set", "WORLD_SIZE=2"]),
    ({k: v for k, v in torchrun_env().items() if k != "MASTER_PORT"}, ["MASTER_PORT is not set"]),
    (torchrun_env(MASTER_PORT="70000"), ["MASTER_PORT=70000"]),
    (torchrun_env(RANK="one"), ["RANK='one'", "not an integer"]),
    (torchrun_env(LOCAL_RANK="2"), ["LOCAL_RANK=2", "LOCAL_WORLD_SIZE=2"]),
    ({"RANK": "1", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, ["WORLD_SIZE not set"]),
    (srun_env(WORLD_SIZE="4"), ["WORLD_SIZE=4", "SLURM_NTASKS=2", "unset WORLD_SIZE"]),
    (srun_env(procid=1, RANK="0"), ["RANK=0", "SLURM_PROCID=1"]),
    (srun_env(procid=2, ntasks=2), ["SLURM_PROCID=2", "0..1"]),
    (srun_env(nodeid=3), ["SLURM_NODEID=3"]),
    (srun_env(per_node="3"), ["add up to 3", "2 tasks"]),
    ({**torchrun_env(), **srun_env(ntasks=4, per_node="4"), "SLURM_STEP_NUM_NODES": "1"},
     ["launcher", "4 tasks on 1 node", "--ntasks-per-node=1"]),
])
def test_inconsistent_environment_fails_fast(env, words):
    with pytest.raises(LaunchError) as e:
        discover_launch(env)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def _fail_mpi_import(monkeypatch, error):
    real = builtins.__import__

    def fake(name, globals=None, locals=None, fromlist=(), level=0):
        if name.startswith("mpi4py"):
            raise error
        return real(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_mpi_without_library_says_what_to_install(monkeypatch):
    _fail_mpi_import(monkeypatch, RuntimeError("cannot load MPI library: libmpi.so.40: cannot open shared object"))
    with pytest.raises(LaunchError) as e:
        discover_launch({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    assert "libmpi.so.40" in str(e.value) and "apt-get install openmpi-bin" in str(e.value)
    _fail_mpi_import(monkeypatch, ModuleNotFoundError("No module named 'mpi4py'"))
    with pytest.raises(LaunchError, match="pip install mpi4py"):
        discover_launch({"PMI_RANK": "0", "PMI_SIZE": "2"})


def test_srun_with_pmi_plugin_does_not_import_mpi(monkeypatch):
    _fail_mpi_import(monkeypatch, AssertionError("mpi4py must not be imported for an srun launch"))
    info = discover_launch(srun_env(procid=1, PMI_RANK="1", PMI_SIZE="2"))
    assert info.method == "slurm"
    # mpirun inside an allocation: the MPI rank differs from the inherited SLURM_PROCID -> MPI
    with pytest.raises(LaunchError, match="mpi4py must not be imported"):
        discover_launch(srun_env(procid=0, OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2"))


class FakeComm:
    def __init__(self, rank, size, hosts):
        self.rank, self.size, self.hosts = rank, size, hosts

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def allgather(self, value):
        return self.hosts

    def bcast(self, value, root=0):
        return value if self.rank == 0 else ("rank0-addr", 5555)


class FakeMPI:
    def __init__(self, comm):
        self.COMM_WORLD, self.finalized = comm, False

    def Get_library_version(self):
        return "Fake MPI 1.0, test"

    def Is_finalized(self):
        return self.finalized

    def Finalize(self):
        assert not self.finalized
        self.finalized = True


def _fake_mpi(monkeypatch, comm):
    mpi = FakeMPI(comm)
    monkeypatch.setattr(D, "_import_mpi", lambda flavour: mpi)
    monkeypatch.setattr(D, "_MPI_FOUND", [])
    return mpi


def test_mpi_discovery_logic(monkeypatch):
    mpi = _fake_mpi(monkeypatch, FakeComm(1, 2, [HOST, HOST]))
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    info = discover_launch(env)
    assert (info.method, info.rank, info.local_rank, info.master_addr, info.master_port) == ("mpi", 1, 1,
                                                                                           "rank0-addr", 5555)
    # MPI is finalised right away (a failing rank then ends the mpirun job at once); asking
    # again returns the same answer without touching MPI.
    assert mpi.finalized and discover_launch(env) == info
    _fake_mpi(monkeypatch, FakeComm(0, 3, [HOST, "b", HOST]))  # MPICH-style, no local variables
    info = discover_launch({"PMI_RANK": "0", "PMI_SIZE": "3", "MASTER_PORT": "6000"})
    assert (info.local_rank, info.local_world_size, info.master_port) == (0, 2, 6000)
    assert info.master_addr != "127.0.0.1"  # several hosts: a routable address of rank 0


def test_mpi_library_mismatch_is_explained(monkeypatch):
    _fake_mpi(monkeypatch, FakeComm(0, 1, [HOST]))  # mpi4py sees a singleton: wrong libmpi
    with pytest.raises(LaunchError, match="different MPI library"):
        discover_launch({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"})


def test_shared_gpu_is_refused():
    dev = {"type": "cuda", "index": 0, "name": "H100", "uuid": "GPU-1", "memory_gib": 80}
    by_host = {"n1": [{"rank": 0, "device": dev}, {"rank": 1, "device": dict(dev)}]}
    assert "ranks 0 and 1 on n1 use the same GPU" in P._shared_gpus(by_host)
    assert P._shared_gpus({"n1": [{"rank": 0, "device": {"type": "cpu"}}] * 2}) is None


# --------------------------------------------------------------------------- init + preflight


def test_init_single_process(clean_env, caplog):
    import torch.distributed as dist

    cfg = DistributedConfig(backend="auto", timeout_s=30, preflight_timeout_s=10)
    try:
        with caplog.at_level(logging.INFO, logger="megatrain.launch"):
            launch = R.init_distributed(cfg, "cpu")
            launch.preflight(5)  # a second preflight uses fresh keys
        info = launch.info
        assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
        assert info.method == "single" and info.master_port > 0
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
        assert os.environ["MASTER_ADDR"] == "127.0.0.1" and os.environ["MASTER_PORT"] == str(info.master_port)
        assert "found by single" in caplog.text and caplog.text.count("preflight ok: 1 rank(s) on 1 host(s)") == 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_nccl_on_cpu_is_a_config_error(clean_env):
    with pytest.raises(ConfigError, match="distributed.backend=nccl"):
        R.init_distributed(DistributedConfig(backend="nccl"), "cpu")


def test_preflight_needs_a_process_group():
    import torch.distributed as dist

    assert not dist.is_initialized()
    with pytest.raises(LaunchError, match="init_distributed first"):
        P.preflight(1)


def test_missing_rank0_ends_within_timeout(clean_env):
    port = D.free_port()  # nobody listens there: rank 0 "never started"
    clean_env.update({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as e:
        R.init_distributed(DistributedConfig(timeout_s=2, preflight_timeout_s=2), "cpu")
    assert time.monotonic() - t0 < 10
    assert f"rank 1 on {HOST} could not reach rank 0's rendezvous at 127.0.0.1:{port}" in str(e.value)


def test_busy_master_port_is_explained(clean_env):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        clean_env.update({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        with pytest.raises(LaunchError, match=f"could not open the rendezvous port {port}.*set MASTER_PORT"):
            R.init_distributed(DistributedConfig(timeout_s=2, preflight_timeout_s=2), "cpu")


def test_missing_rank_is_named_within_timeout(clean_env):
    clean_env.update({"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(D.free_port())})
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match=r"ranks 1-2 of 3 did not join the rendezvous .* within "
                                          r"distributed.timeout_s=1.5s \(1 did\)"):
        R.init_distributed(DistributedConfig(timeout_s=1.5, preflight_timeout_s=2), "cpu")
    assert time.monotonic() - t0 < 8
