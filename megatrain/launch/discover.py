"""Who am I and who are the others: the launch environment turned into one :class:`LaunchInfo`.

megatrain is started three ways:

* **torchrun / the deepspeed launcher** (or any launcher that exports ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): the variables are taken as they are.
* **Slurm's srun** (one task per GPU): ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NUM_TASKS``;
  the master is the first host of the step's node list (``127.0.0.1`` for a one-node step),
  the port is derived from the job id unless ``MASTER_PORT`` is set.
* **mpirun** (OpenMPI, MPICH, MVAPICH): ranks come from mpi4py, which is imported only then;
  rank 0's address and a free port are broadcast over MPI.

:func:`megatrain.launch.rendezvous.init_distributed` then joins the ranks into a process group and
:mod:`megatrain.launch.preflight` checks that they can talk.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import logging
import os
import re
import socket
from dataclasses import dataclass
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

# This process's MPI launch, once discovered: MPI is initialised once per process and finalised after
# discovery, so the answer is a fact of the process (the one cache of process-wide state here).
_MPI_FOUND: list[LaunchInfo] = []


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
