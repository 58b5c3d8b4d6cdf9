"""Who am I, who are the others, and can we talk: launch discovery, process-group init, preflight.

megatrain is started three ways and this module turns each into one :class:`LaunchInfo`:

* **torchrun / the deepspeed launcher** (or any launcher that exports ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): the variables are taken as they are.
* **Slurm's srun** (one task per GPU): ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS``;
  the master is the first host of the step's node list (``127.0.0.1`` for a one-node step),
  the port is derived from the job id unless ``MASTER_PORT`` is set.
* **mpirun** (OpenMPI, MPICH, MVAPICH): ranks come from mpi4py, which is imported only then;
  rank 0's address and a free port are broadcast over MPI.

:func:`init_distributed` then exports the variables DeepSpeed reads, picks the GPU, runs our own
rendezvous on a TCPStore (so a rank that never shows up is *named* when the timeout expires),
initialises ``torch.distributed`` on that store and runs :func:`preflight`.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping, Optional

logger = logging.getLogger(__name__)

METHODS = ("torchrun", "slurm", "mpi", "single")
# Variables only a launcher sets; their presence means "a launcher made these ranks, trust it".
_TORCHRUN_MARKERS = ("TORCHELASTIC_RUN_ID", "GROUP_RANK")
_DEEPSPEED_MARKERS = ("CROSS_RANK", "LOCAL_SIZE")
# (rank, size, local rank, local size) variables of the MPI launchers we know.
_MPI_FLAVOURS = {
    "OpenMPI": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "MPICH/Hydra": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    "MVAPICH": ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE",
                "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
}
# Ports below the Linux ephemeral range (32768+) so a derived port rarely collides with an
# outgoing connection; 10000-29999.
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 10000, 20000
_KEY = "megatrain/"  # prefix of our keys in the rendezvous store


class LaunchError(RuntimeError):
    """The launch environment is inconsistent or unreachable; the message says what to fix."""


@dataclass
class LaunchInfo:
    """Where this process sits in the job, and how it was found."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    method: str  # torchrun | slurm | mpi | single
    hostname: str
    source: str = ""  # human words: which variables or launcher the values came from

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} (local {self.local_rank}/{self.local_world_size}) "
                f"on {self.hostname}, master {self.master_addr}:{self.master_port or '<free port>'}, "
                f"found by {self.method}" + (f": {self.source}" if self.source else ""))


# --------------------------------------------------------------------------- helpers


def _int(env: Mapping[str, str], name: str, default: Optional[int] = None) -> Optional[int]:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not an integer; fix or unset it") from None


def _present(env: Mapping[str, str], *names: str) -> bool:
    return any(env.get(n, "").strip() != "" for n in names)


def free_port(host: str = "") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and ask the kernel)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm host list: ``gpu[01-03,7],login-a[1-2]-x`` -> gpu01 gpu02 gpu03 gpu7 login-a1-x ...

    Zero padding of range bounds is kept, as Slurm does; several bracket groups in one name
    expand as a cartesian product.
    """
    names: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(hostlist + ","):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            if hostlist[start:i].strip():
                names += _expand_one(hostlist[start:i].strip(), hostlist)
            start = i + 1
    if depth != 0:
        raise LaunchError(f"cannot parse the Slurm host list {hostlist!r}: unbalanced brackets")
    return names


def _expand_one(name: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if m is None:
        return [name]
    head, tail = name[:m.start()], name[m.end():]
    out = []
    for part in m.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise LaunchError(f"cannot parse the Slurm host list {whole!r} at {part!r}")
        width = len(lo)
        for n in range(int(lo), int(hi or lo) + 1):
            out += _expand_one(f"{head}{n:0{width}d}{tail}", whole)
    return out


def expand_tasks_per_node(spec: str) -> list[int]:
    """``2(x3),1`` (Slurm's SLURM_STEP_TASKS_PER_NODE) -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise LaunchError(f"cannot parse Slurm's tasks-per-node value {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


# --------------------------------------------------------------------------- discovery


def discover_launch(environ: Mapping[str, str] = os.environ, timeout_s: float = 600.0) -> LaunchInfo:
    """Find rank, world and master from the launcher's environment; raise LaunchError if inconsistent.

    ``timeout_s`` bounds the wait for the other ranks where discovery talks to them (MPI).
    Order: a launcher's own markers (torchrun, deepspeed) win; then an MPI launch unless it is
    really srun with a PMI plugin; then srun; then plain RANK/WORLD_SIZE; else a single process.
    """
    env = dict(environ)
    mpi_flavour = _mpi_flavour(env)
    in_srun_step = _present(env, "SLURM_STEP_ID", "SLURM_STEPID") and _present(env, "SLURM_PROCID")
    if _present(env, *_TORCHRUN_MARKERS, *_DEEPSPEED_MARKERS):
        info = _from_launcher(env, in_srun_step)
    elif mpi_flavour and not (in_srun_step and _mpi_matches_slurm(env, mpi_flavour)):
        info = _from_mpi(env, mpi_flavour, timeout_s)
    elif in_srun_step:
        info = _from_slurm(env)
    elif _present(env, "RANK", "WORLD_SIZE"):
        info = _from_launcher(env, False)
    else:
        info = _single(env)
    _validate(info)
    return info


def _mpi_flavour(env: dict) -> Optional[str]:
    for flavour, names in _MPI_FLAVOURS.items():
        if _present(env, names[0]) or _present(env, names[1]):
            return flavour
    if _present(env, "PMIX_RANK"):
        return "PMIx"
    return None


def _mpi_matches_slurm(env: dict, flavour: str) -> bool:
    """srun --mpi=pmi2/pmix exports PMI ranks that equal Slurm's: then it is an srun launch."""
    if flavour == "PMIx":
        return _int(env, "PMIX_RANK") == _int(env, "SLURM_PROCID")
    rank_var, size_var = _MPI_FLAVOURS[flavour][:2]
    return (_int(env, rank_var) == _int(env, "SLURM_PROCID")
            and _int(env, size_var) == _slurm_step_tasks(env))


def _slurm_step_tasks(env: dict) -> Optional[int]:
    return _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS"))


def _from_launcher(env: dict, in_srun_step: bool) -> LaunchInfo:
    """torchrun, the deepspeed launcher, or RANK/WORLD_SIZE exported by hand or by a scheduler."""
    if _present(env, *_TORCHRUN_MARKERS):
        source = "variables set by torchrun"
    elif _present(env, *_DEEPSPEED_MARKERS):
        source = "variables set by the deepspeed launcher"
    else:
        source = "RANK/WORLD_SIZE exported without a known launcher"
    missing = [n for n in ("RANK", "WORLD_SIZE") if not _present(env, n)]
    if missing:
        raise LaunchError(f"{source}: {' and '.join(missing)} not set; a launcher must export RANK, WORLD_SIZE, "
                          f"LOCAL_RANK, MASTER_ADDR and MASTER_PORT together (unset the partial ones to run "
                          f"a single process)")
    world = _int(env, "WORLD_SIZE")
    if in_srun_step:
        _check_launcher_inside_srun(env, world)
    local_rank = _int(env, "LOCAL_RANK", 0)
    local_world = _int(env, "LOCAL_WORLD_SIZE", _int(env, "LOCAL_SIZE", local_rank + 1))
    master_addr = env.get("MASTER_ADDR", "").strip()
    port = _int(env, "MASTER_PORT")
    if world > 1 and not master_addr:
        raise LaunchError(f"{source}: MASTER_ADDR is not set but WORLD_SIZE={world}; export MASTER_ADDR=<host of "
                          f"rank 0> (torchrun and deepspeed set it; check your launcher)")
    if world > 1 and port is None:
        raise LaunchError(f"{source}: MASTER_PORT is not set but WORLD_SIZE={world}; export MASTER_PORT=<free "
                          f"port on rank 0's host>, e.g. 29500")
    return LaunchInfo(rank=_int(env, "RANK"), local_rank=local_rank, world_size=world,
                      local_world_size=local_world, master_addr=master_addr or "127.0.0.1",
                      master_port=port if port is not None else 0, method="torchrun",
                      hostname=socket.gethostname(), source=source)


def _check_launcher_inside_srun(env: dict, world: int) -> None:
    """A launcher (torchrun, deepspeed) under srun must be one task per node, or ranks multiply."""
    tasks, nodes = _slurm_step_tasks(env), _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_NNODES", 1))
    if tasks is not None and nodes and tasks > nodes:
        raise LaunchError(f"a launcher (torchrun/deepspeed) runs inside an srun step of {tasks} tasks on {nodes} "
                          f"node(s), so each node starts several launchers; run one launcher per node "
                          f"(srun --ntasks-per-node=1) or drop the launcher and let srun start one task per GPU")


def _check_against_slurm(env: dict) -> None:
    pairs = [("WORLD_SIZE", _slurm_step_tasks(env), "SLURM_NTASKS"),
             ("RANK", _int(env, "SLURM_PROCID"), "SLURM_PROCID"),
             ("LOCAL_RANK", _int(env, "SLURM_LOCALID"), "SLURM_LOCALID")]
    for name, slurm_value, slurm_name in pairs:
        value = _int(env, name)
        if value is not None and slurm_value is not None and value != slurm_value:
            raise LaunchError(f"{name}={value} disagrees with Slurm's {slurm_name}={slurm_value} in this srun step; "
                              f"unset {name} (srun provides the ranks) or launch with a matching --ntasks")


def _from_slurm(env: dict) -> LaunchInfo:
    _check_against_slurm(env)
    world = _slurm_step_tasks(env)
    if world is None:
        raise LaunchError("inside an srun step but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS is set; "
                          "launch with srun --ntasks=N")
    node_id = _int(env, "SLURM_NODEID", 0)
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    counts = expand_tasks_per_node(per_node) if per_node else [world]
    if node_id >= len(counts):
        raise LaunchError(f"SLURM_NODEID={node_id} but the tasks-per-node list {per_node!r} has {len(counts)} "
                          f"entries; the Slurm environment is inconsistent (was it copied from another job?)")
    if sum(counts) != world:
        raise LaunchError(f"Slurm's tasks per node {per_node!r} add up to {sum(counts)} but the step has "
                          f"{world} tasks; do not override SLURM_NTASKS by hand")
    hosts_var = "SLURM_STEP_NODELIST" if _present(env, "SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
    hosts = expand_hostlist(env.get(hosts_var, "") or env.get("SLURM_NODELIST", ""))
    master_addr, source = env.get("MASTER_ADDR", "").strip(), "MASTER_ADDR"
    if not master_addr:
        if not hosts:
            raise LaunchError("inside an srun step but SLURM_STEP_NODELIST / SLURM_JOB_NODELIST is empty and "
                              "MASTER_ADDR is not set; export MASTER_ADDR=<first node of the job>")
        # One node: loopback avoids depending on how the node's own name resolves.
        master_addr, source = ("127.0.0.1", "one-node step") if len(hosts) == 1 else (hosts[0], hosts_var)
    port = _int(env, "MASTER_PORT")
    if port is None:
        job = _int(env, "SLURM_JOB_ID", _int(env, "SLURM_JOBID", 0))
        port = _SLURM_PORT_BASE + job % _SLURM_PORT_SPAN
    return LaunchInfo(rank=_int(env, "SLURM_PROCID"), local_rank=_int(env, "SLURM_LOCALID", 0), world_size=world,
                      local_world_size=counts[node_id], master_addr=master_addr, master_port=port, method="slurm",
                      hostname=env.get("SLURMD_NODENAME") or socket.gethostname(),
                      source=f"srun step {env.get('SLURM_JOB_ID', '?')}.{env.get('SLURM_STEP_ID', '?')}, "
                             f"master from {source}")


def _single(env: dict) -> LaunchInfo:
    tasks = _int(env, "SLURM_NTASKS")
    if tasks and tasks > 1 and _present(env, "SLURM_JOB_ID"):
        logger.warning("inside Slurm job %s with %d tasks but not started by srun: training as ONE process; "
                       "start it with `srun python -m megatrain.train ...` to use all tasks",
                       env.get("SLURM_JOB_ID"), tasks)
    return LaunchInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, master_addr="127.0.0.1",
                      master_port=_int(env, "MASTER_PORT", 0), method="single", hostname=socket.gethostname(),
                      source="no launcher detected")


# --------------------------------------------------------------------------- MPI

_MPI_FOUND: list[LaunchInfo] = []  # this process's MPI launch, once discovered


def _import_mpi(flavour: str) -> Any:
    """mpi4py, imported only now: its wheel needs an MPI library at run time, which many hosts lack."""
    try:
        from mpi4py import MPI
    except ModuleNotFoundError:
        raise LaunchError(f"started by {flavour}'s mpirun but mpi4py is not installed; `pip install mpi4py`, "
                          f"or start megatrain with torchrun, deepspeed or srun instead") from None
    except Exception as e:  # noqa: BLE001 - mpi4py raises RuntimeError or ImportError for a missing libmpi
        raise LaunchError(f"started by {flavour}'s mpirun but mpi4py cannot load an MPI library ({e}). Install the "
                          f"MPI runtime that launched the job: OpenMPI provides libmpi.so.40 (Debian/Ubuntu: "
                          f"apt-get install openmpi-bin libopenmpi3), MPICH provides libmpi.so.12 (apt-get install "
                          f"mpich); or start megatrain with torchrun, deepspeed or srun instead") from None
    return MPI


def _from_mpi(env: dict, flavour: str, timeout_s: float) -> LaunchInfo:
    if _MPI_FOUND:  # MPI is finalised after the first discovery; the answer does not change
        return dataclasses.replace(_MPI_FOUND[0])
    # MPI_Init and MPI collectives wait for every rank with no timeout of their own (OpenMPI's
    # MPI_Init is a fence), so a rank that never starts would block the others forever. A C-level
    # watchdog (it runs even while MPI holds the GIL) prints where we are stuck and exits; a
    # process that exits non-zero makes mpirun end the job.
    logger.info("MPI launch (%s): every rank must start MPI within distributed.timeout_s=%gs, or this process "
                "exits with a traceback (\"Timeout\") and mpirun ends the job", flavour, timeout_s)
    faulthandler.dump_traceback_later(timeout_s, exit=True)
    try:
        info = _mpi_discovery(env, flavour)
    finally:
        faulthandler.cancel_dump_traceback_later()
    _MPI_FOUND.append(info)
    return dataclasses.replace(info)


def _mpi_discovery(env: dict, flavour: str) -> LaunchInfo:
    MPI = _import_mpi(flavour)
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    names = _MPI_FLAVOURS.get(flavour, ("PMIX_RANK", None, None, None))
    env_rank, env_size = _int(env, names[0]), _int(env, names[1]) if names[1] else None
    if (env_size is not None and env_size != world) or (env_rank is not None and env_rank != rank):
        raise LaunchError(f"{flavour} started this process as rank {env_rank} of {env_size}, but mpi4py sees rank "
                          f"{rank} of {world}: mpi4py loaded a different MPI library ({_mpi_library(MPI)}) than the "
                          f"mpirun that started the job. Use the mpirun of that library, or install the matching "
                          f"MPI runtime (one MPI per machine avoids this)")
    hostname = socket.gethostname()
    hosts = comm.allgather(hostname)
    local_rank = _int(env, names[2]) if names[2] else None
    local_world = _int(env, names[3]) if names[3] else None
    if local_rank is None or local_world is None:
        local_rank, local_world = hosts[:rank].count(hostname), hosts.count(hostname)
    # Rank 0 decides address and port and tells everyone, so all ranks agree even if their
    # environments differ; one host only -> loopback, which needs no name resolution.
    master = None
    if rank == 0:
        addr = env.get("MASTER_ADDR", "").strip() or ("127.0.0.1" if len(set(hosts)) == 1 else _routable_address(env))
        master = (addr, _int(env, "MASTER_PORT") or free_port())
    master_addr, master_port = comm.bcast(master, root=0)
    # Finalise now, while every rank is here. Left for exit, OpenMPI's MPI_Finalize waits for all
    # ranks, so a rank that fails later would sit in it while the others wait for that rank in a
    # torch collective (a hang until the timeout); finalised, its non-zero exit makes mpirun end
    # the whole job at once.
    if not MPI.Is_finalized():
        MPI.Finalize()
    return LaunchInfo(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
                      master_addr=master_addr, master_port=master_port, method="mpi", hostname=hostname,
                      source=f"{flavour} via mpi4py ({_mpi_library(MPI)}), master broadcast by rank 0")


def _mpi_library(MPI: Any) -> str:
    try:
        return MPI.Get_library_version().strip().splitlines()[0].split(",")[0][:60]
    except Exception:  # noqa: BLE001 - only used in messages
        return "unknown MPI"


def _routable_address(env: Mapping[str, str]) -> str:
    """An IPv4 address other hosts can reach this one at (for MPI launches, which name no master)."""
    ifname = (env.get("GLOO_SOCKET_IFNAME") or env.get("NCCL_SOCKET_IFNAME") or "").split(",")[0].strip()
    addresses = _interface_addresses()
    if ifname and not ifname.startswith(("^", "=")):
        for name, addr in addresses:
            if name.startswith(ifname):
                return addr
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if not addr.startswith("127."):
            return addr
    except OSError:
        pass
    # Debian maps the host name to 127.0.1.1: fall back to the first non-loopback interface.
    for _, addr in addresses:
        return addr
    return socket.gethostname()


def _interface_addresses() -> list[tuple[str, str]]:
    import fcntl
    import struct

    out = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:  # SIOCGIFADDR: the interface's IPv4 address
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
        addr = socket.inet_ntoa(packed[20:24])
        if not addr.startswith("127."):
            out.append((name, addr))
    return out


# --------------------------------------------------------------------------- validation

_VARS = {  # which variables to blame, per method: (rank, world, local rank, local world)
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),
    "mpi": ("the MPI rank", "the MPI world size", "the MPI local rank", "the MPI local size"),
    "single": ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
}


def _validate(info: LaunchInfo) -> None:
    r, w, lr, lw = _VARS[info.method]
    where = f"({info.source})"
    if info.world_size < 1:
        raise LaunchError(f"{w}={info.world_size} {where}: the world needs at least one process")
    if not 0 <= info.rank < info.world_size:
        raise LaunchError(f"{r}={info.rank} is not in 0..{info.world_size - 1} for {w}={info.world_size} {where}: "
                          f"ranks count from 0 and must be below the world size; fix the launcher's variables")
    if info.local_world_size < 1 or info.local_world_size > info.world_size:
        raise LaunchError(f"{lw}={info.local_world_size} {where} must be between 1 and {w}={info.world_size}")
    if not 0 <= info.local_rank < info.local_world_size:
        raise LaunchError(f"{lr}={info.local_rank} is not in 0..{info.local_world_size - 1} for "
                          f"{lw}={info.local_world_size} {where}; fix the launcher's variables")
    if not 0 <= info.master_port <= 65535 or (info.master_port == 0 and info.world_size > 1):
        raise LaunchError(f"MASTER_PORT={info.master_port} {where} is not a usable TCP port; choose one in 1024-65535")


# --------------------------------------------------------------------------- init

# This process's rendezvous store and host name: preflight() reads them. One process has one
# default process group, so one slot is enough.
_STATE: dict[str, Any] = {"store": None, "hostname": None, "preflights": 0}


def init_distributed(dist_cfg: Any, device_type: str) -> LaunchInfo:
    """Discover the launch, export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* for DeepSpeed, pick the GPU,
    rendezvous (naming ranks that never join), init torch.distributed, run :func:`preflight`.

    ``dist_cfg`` is a :class:`megatrain.config.DistributedConfig`; ``device_type`` is "cuda" or "cpu".
    """
    import torch.distributed as dist

    info = discover_launch(os.environ, float(dist_cfg.timeout_s))
    backend = _pick_backend(dist_cfg.backend, device_type)
    device_index = _pick_device(info, device_type)
    _STATE["hostname"] = info.hostname
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (info.rank, info.world_size):
            raise LaunchError(f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                              f"{dist.get_world_size()}, but the launch says rank {info.rank} of {info.world_size}")
        logger.warning("torch.distributed was already initialised by someone else; reusing it")
    else:
        store = _rendezvous(info, float(dist_cfg.timeout_s))
        _export_env(info, device_index)
        extra: dict[str, Any] = {}
        if backend == "nccl":
            import torch

            extra["device_id"] = torch.device("cuda", device_index)  # eager NCCL init: errors surface here
        dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size,
                                timeout=timedelta(seconds=float(dist_cfg.timeout_s)), **extra)
    # after the rendezvous: a single process's port is the one the kernel chose, not "<free port>"
    logger.info("launch: %s; backend %s", info.describe(), backend)
    preflight(float(dist_cfg.preflight_timeout_s))
    return info


def _pick_backend(requested: str, device_type: str) -> str:
    import torch.distributed as dist
    from megatrain.config import ConfigError

    backend = ("nccl" if device_type == "cuda" else "gloo") if requested == "auto" else requested
    if backend == "nccl" and device_type != "cuda":
        raise ConfigError(f"distributed.backend=nccl needs CUDA devices but this run uses {device_type!r}; "
                          f"use distributed.backend=auto or gloo")
    if backend == "nccl" and not dist.is_nccl_available():
        raise ConfigError("distributed.backend=nccl but this torch build has no NCCL; install a CUDA build of torch")
    if backend == "gloo" and not dist.is_gloo_available():
        raise ConfigError("distributed.backend=gloo but this torch build has no gloo; use distributed.backend=nccl")
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"distributed.backend={requested!r}: choose one of auto, nccl, gloo")
    return backend


def _pick_device(info: LaunchInfo, device_type: str) -> Optional[int]:
    """The CUDA device of this rank: its local rank, or 0 when each task sees exactly one GPU."""
    if device_type != "cuda":
        return None
    import torch

    visible = torch.cuda.device_count()
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    if visible == 0:
        raise LaunchError(f"this run wants CUDA but {info.hostname} shows no GPU (CUDA_VISIBLE_DEVICES={cvd}); "
                          f"request GPUs from the scheduler or run on CPU")
    if visible >= info.local_world_size:
        index = info.local_rank
    elif visible == 1:
        index = 0  # Slurm --gpus-per-task=1 (or a wrapper) gave each task its own single GPU
    else:
        raise LaunchError(f"{info.local_world_size} processes on {info.hostname} but only {visible} GPUs visible "
                          f"(CUDA_VISIBLE_DEVICES={cvd}); start at most one process per GPU "
                          f"(--ntasks-per-node={visible}, --nproc-per-node={visible})")
    torch.cuda.set_device(index)
    return index


def _export_env(info: LaunchInfo, device_index: Optional[int]) -> None:
    # DeepSpeed reads these; LOCAL_RANK is also what it passes to set_device, so it must be the
    # device index this process uses, which differs from the local rank with one GPU per task.
    os.environ.update({
        "RANK": str(info.rank), "WORLD_SIZE": str(info.world_size),
        "LOCAL_RANK": str(device_index if device_index is not None else info.local_rank),
        "LOCAL_WORLD_SIZE": str(info.local_world_size),
        "MASTER_ADDR": info.master_addr, "MASTER_PORT": str(info.master_port),
    })


def _rendezvous(info: LaunchInfo, timeout_s: float) -> Any:
    """Open rank 0's TCPStore and wait until every rank has checked in, or name the ones that did not."""
    import torch.distributed as dist

    # torchrun's agent already serves a store on MASTER_PORT; rank 0 joins it as a client, and
    # keys go under the restart attempt so a restarted worker group never sees stale ones.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    is_master = info.rank == 0 and not agent_store
    try:
        store = dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    except Exception as e:  # noqa: BLE001 - DistNetworkError / RuntimeError, re-raised with advice
        if is_master:
            raise LaunchError(f"rank 0 could not open the rendezvous port {info.master_port} on {info.hostname} "
                              f"({_first_line(e)}); another job may hold it: set MASTER_PORT to a free port") from None
        raise LaunchError(f"rank {info.rank} on {info.hostname} could not reach rank 0's rendezvous at "
                          f"{info.master_addr}:{info.master_port} within distributed.timeout_s={timeout_s:g}s "
                          f"({_first_line(e)}): rank 0 did not start or died, or MASTER_ADDR/MASTER_PORT point "
                          f"elsewhere, or a firewall blocks the port") from None
    if info.master_port == 0:
        info.master_port = store.port  # single process: the kernel chose a free port
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"{_KEY}attempt_{attempt}/", store)
    _STATE["store"] = store
    if info.world_size > 1:
        _wait_for_ranks(store, info, timeout_s)
    return store


def _wait_for_ranks(store: Any, info: LaunchInfo, timeout_s: float) -> None:
    joined = [f"{_KEY}joined/{r}" for r in range(info.world_size)]
    verdict = f"{_KEY}rendezvous"
    store.set(joined[info.rank], json.dumps({"host": info.hostname, "pid": os.getpid()}))
    if info.rank != 0:
        try:
            store.wait([verdict], timedelta(seconds=timeout_s + 5))
            answer = store.get(verdict).decode()
        except Exception as e:  # noqa: BLE001
            raise LaunchError(f"rank {info.rank}: rank 0 did not confirm the rendezvous at {info.master_addr}:"
                              f"{info.master_port} within {timeout_s:g}s ({_first_line(e)}); see rank 0's log"
                              ) from None
        if answer != "ok":
            raise LaunchError(answer)
        return
    deadline = time.monotonic() + timeout_s
    while not store.check(joined):
        if time.monotonic() > deadline:
            missing = [r for r in range(info.world_size) if not store.check([joined[r]])]
            message = (f"{_ranks(missing)} of {info.world_size} did not join the rendezvous at "
                       f"{info.master_addr}:{info.master_port} within distributed.timeout_s={timeout_s:g}s "
                       f"({info.world_size - len(missing)} did). Check that they started (their logs), that "
                       f"{info.master_addr} is reachable from their hosts, and that all were given the same "
                       f"MASTER_ADDR/MASTER_PORT")
            store.set(verdict, message)
            raise LaunchError(message)
        time.sleep(0.05)
    store.set(verdict, "ok")
    logger.info("rendezvous: all %d ranks joined at %s:%d", info.world_size, info.master_addr, info.master_port)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _ranks(values: list[int]) -> str:
    return f"rank{'s' if len(values) > 1 else ''} {_ranges(values)}"


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (a thousand missing ranks stay one line)."""
    out, values = [], sorted(values)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(out)


# --------------------------------------------------------------------------- preflight


def preflight(timeout_s: float) -> None:
    """A small all-reduce that must finish within ``timeout_s``, then a hosts/devices report on rank 0.

    Every rank first records (host, device) in the rendezvous store, so when the all-reduce times
    out or fails the message can say which ranks never arrived, or that all arrived and the
    backend itself is broken. Also refuses two ranks sharing one GPU.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        raise LaunchError("preflight needs torch.distributed to be initialised; call init_distributed first")
    rank, world, backend = dist.get_rank(), dist.get_world_size(), str(dist.get_backend())
    store = _STATE["store"] or _default_store()
    _STATE["preflights"] += 1
    prefix = f"{_KEY}preflight/{_STATE['preflights']}/"
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    me = {"rank": rank, "host": _STATE["hostname"] or socket.gethostname(), "device": _describe_device(device)}
    store.set(prefix + str(rank), json.dumps(me))
    x = torch.tensor([float(rank + 1)], dtype=torch.float64, device=device)
    t0 = time.monotonic()
    group = None
    try:
        if backend == "gloo":
            # A gloo op left pending on the default group blocks interpreter exit until
            # distributed.timeout_s; on a group with the preflight timeout a failed check exits at once.
            group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        dist.all_reduce(x, group=group, async_op=True).wait(timeout=timedelta(seconds=timeout_s))
        total = float(x.item())  # .item() also waits for the device
    except Exception as e:  # noqa: BLE001 - turned into a message that names ranks
        message = _preflight_failure(store, prefix, world, backend, timeout_s, e)
        if backend == "nccl":
            _abort_default_group()
        raise LaunchError(message) from None
    if group is not None:
        dist.destroy_process_group(group)
    elapsed_ms = (time.monotonic() - t0) * 1000
    if total != world * (world + 1) / 2:
        raise LaunchError(f"preflight all-reduce over {backend} returned {total} instead of {world * (world + 1) / 2}: "
                          f"the backend corrupts data; check the network / NCCL settings (NCCL_DEBUG=INFO)")
    _check_report(store, prefix, rank, world, backend, elapsed_ms, timeout_s)


def _abort_default_group() -> None:
    """Tear NCCL down now: a collective stuck on a missing rank would otherwise block exit."""
    try:
        from torch.distributed import distributed_c10d

        distributed_c10d._abort_process_group()
    except Exception:  # noqa: BLE001 - best effort; the error we are about to raise matters more
        logger.debug("could not abort the NCCL process group", exc_info=True)


def _default_store() -> Any:
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()  # only when someone else initialised the group


def _describe_device(device: Any) -> dict:
    if device.type != "cuda":
        return {"type": "cpu"}
    import torch

    props = torch.cuda.get_device_properties(device)
    uuid = str(getattr(props, "uuid", "")) or f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')}:{device.index}"
    return {"type": "cuda", "index": device.index, "name": props.name, "uuid": uuid,
            "memory_gib": round(props.total_memory / 2**30, 1)}


def _preflight_failure(store: Any, prefix: str, world: int, backend: str, timeout_s: float, e: BaseException) -> str:
    try:
        missing = [r for r in range(world) if not store.check([prefix + str(r)])]
    except Exception:  # noqa: BLE001 - the store lives in rank 0: unreachable means rank 0 is gone
        return (f"preflight all-reduce over {backend} failed ({_first_line(e)}) and rank 0's store is unreachable: "
                f"rank 0 died; see its log")
    if missing:
        return (f"preflight all-reduce over {backend} did not finish within distributed.preflight_timeout_s="
                f"{timeout_s:g}s: {_ranks(missing)} of {world} never reached it (they joined the "
                f"rendezvous, then hung or crashed; see their logs). Error: {_first_line(e)}")
    hint = ("set NCCL_DEBUG=INFO and check NCCL_SOCKET_IFNAME / NCCL_IB_HCA (the interfaces the hosts share)"
            if backend == "nccl" else "set GLOO_SOCKET_IFNAME to an interface every host can reach")
    return (f"preflight all-reduce over {backend} failed although all {world} ranks reached it, so the backend "
            f"cannot move data between them ({_first_line(e)}); {hint}")


def _check_report(store: Any, prefix: str, rank: int, world: int, backend: str, ms: float, timeout_s: float) -> None:
    """Rank 0 reads everyone's (host, device), checks for shared GPUs, tells the others, logs a report."""
    verdict = prefix + "verdict"
    if rank != 0:
        try:
            store.wait([verdict], timedelta(seconds=timeout_s))
            answer = store.get(verdict).decode()
        except Exception as e:  # noqa: BLE001
            raise LaunchError(f"rank {rank}: rank 0 did not finish the preflight report within {timeout_s:g}s "
                              f"({_first_line(e)}); see rank 0's log") from None
        if answer != "ok":
            raise LaunchError(answer)
        return
    entries = [json.loads(v) for v in store.multi_get([prefix + str(r) for r in range(world)])]
    by_host: dict[str, list[dict]] = {}
    for entry in entries:
        by_host.setdefault(entry["host"], []).append(entry)
    problem = _shared_gpus(by_host)
    store.set(verdict, problem or "ok")
    if problem:
        raise LaunchError(problem)
    logger.info("preflight ok: %d rank(s) on %d host(s), %s all-reduce in %.1f ms",
                world, len(by_host), backend, ms)
    for i, (host, items) in enumerate(sorted(by_host.items())):
        if i == 16:
            logger.info("  ... and %d more hosts", len(by_host) - 16)
            break
        logger.info("  %s: ranks %s; %s", host, _ranges([e["rank"] for e in items]), _devices_line(items))


def _shared_gpus(by_host: dict[str, list[dict]]) -> Optional[str]:
    for host, items in by_host.items():
        seen: dict[str, int] = {}
        for e in items:
            uuid = e["device"].get("uuid")
            if uuid and uuid in seen:
                return (f"ranks {seen[uuid]} and {e['rank']} on {host} use the same GPU ({e['device']['name']}, "
                        f"cuda:{e['device']['index']}): LOCAL_RANK / CUDA_VISIBLE_DEVICES are wrong; start one "
                        f"process per GPU")
            if uuid:
                seen[uuid] = e["rank"]
    return None


def _devices_line(items: list[dict]) -> str:
    devices = [e["device"] for e in items]
    if all(d["type"] == "cpu" for d in devices):
        return "cpu"
    names = sorted({f"{d['name']} ({d['memory_gib']} GiB)" for d in devices if d["type"] == "cuda"})
    return f"cuda:{_ranges([d['index'] for d in devices if d['type'] == 'cuda'])} " + ", ".join(names)
