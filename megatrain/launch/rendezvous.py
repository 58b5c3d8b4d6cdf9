"""Joining the ranks: export what DeepSpeed reads, pick the GPU, rendezvous on our own TCPStore (so a
rank that never shows up is *named* when the timeout expires), initialise ``torch.distributed`` on it,
then run the preflight check. :func:`init_distributed` returns a :class:`Launch`: the launch facts and
the store, for later checks (no module state)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

from megatrain.config import ConfigError
from megatrain.launch import preflight as preflight_mod
from megatrain.launch.discover import LaunchError, LaunchInfo, discover_launch
from megatrain.launch.text import first_line, rank_list

logger = logging.getLogger(__name__)

KEY = "megatrain/"  # prefix of our keys in the rendezvous store


@dataclass
class Launch:
    """This process's place in the job (``info``), its backend and GPU, and the rendezvous store that
    later checks (:meth:`preflight`) use."""

    info: LaunchInfo
    backend: str
    device_index: Optional[int]
    store: Any = None
    preflights: int = 0

    def preflight(self, timeout_s: float) -> None:
        """Run a preflight check (see :mod:`megatrain.launch.preflight`); each one uses fresh keys."""
        self.preflights += 1
        preflight_mod.preflight(timeout_s, store=self.store, hostname=self.info.hostname, round_=self.preflights)


def init_distributed(dist_cfg: Any, device_type: str) -> Launch:
    """Discover the launch, export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* for DeepSpeed, pick the GPU,
    rendezvous (naming ranks that never join), init torch.distributed, run the preflight check.

    ``dist_cfg`` is a :class:`megatrain.config.DistributedConfig`; ``device_type`` is "cuda" or "cpu".
    """
    import torch.distributed as dist

    info = discover_launch(os.environ, float(dist_cfg.timeout_s))
    backend = _pick_backend(dist_cfg.backend, device_type)
    launch = Launch(info, backend, _pick_device(info, device_type))
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (info.rank, info.world_size):
            raise LaunchError(f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                              f"{dist.get_world_size()}, but the launch says rank {info.rank} of {info.world_size}")
        logger.warning("torch.distributed was already initialised by someone else; reusing it")
    else:
        launch.store = _rendezvous(info, float(dist_cfg.timeout_s))
        _export_env(info, launch.device_index)
        extra: dict[str, Any] = {}
        if backend == "nccl":
            import torch

            extra["device_id"] = torch.device("cuda", launch.device_index)  # eager NCCL init: errors surface here
        dist.init_process_group(backend, store=launch.store, rank=info.rank, world_size=info.world_size,
                                timeout=timedelta(seconds=float(dist_cfg.timeout_s)), **extra)
    # after the rendezvous: a single process's port is the one the kernel chose, not "<free port>"
    logger.info("launch: %s; backend %s", info.describe(), backend)
    launch.preflight(float(dist_cfg.preflight_timeout_s))
    return launch


def _pick_backend(requested: str, device_type: str) -> str:
    import torch.distributed as dist
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
                              f"({first_line(e)}); another job may hold it: set MASTER_PORT to a free port") from None
        raise LaunchError(f"rank {info.rank} on {info.hostname} could not reach rank 0's rendezvous at "
                          f"{info.master_addr}:{info.master_port} within distributed.timeout_s={timeout_s:g}s "
                          f"({first_line(e)}): rank 0 did not start or died, or MASTER_ADDR/MASTER_PORT point "
                          f"elsewhere, or a firewall blocks the port") from None
    if info.master_port == 0:
        info.master_port = store.port  # single process: the kernel chose a free port
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"{KEY}attempt_{attempt}/", store)
    if info.world_size > 1:
        _wait_forrank_list(store, info, timeout_s)
    return store


def _wait_forrank_list(store: Any, info: LaunchInfo, timeout_s: float) -> None:
    joined = [f"{KEY}joined/{r}" for r in range(info.world_size)]
    verdict, conflict = f"{KEY}rendezvous", f"{KEY}conflict"
    _check_launch_agrees(store, info, timeout_s, conflict)
    store.set(joined[info.rank], json.dumps({"host": info.hostname, "pid": os.getpid()}))
    if info.rank != 0:
        try:
            store.wait([verdict], timedelta(seconds=timeout_s + 5))
            answer = store.get(verdict).decode()
            store.add(f"{KEY}verdict_read", 1)
        except Exception as e:  # noqa: BLE001
            raise LaunchError(f"rank {info.rank}: rank 0 did not confirm the rendezvous at {info.master_addr}:"
                              f"{info.master_port} within {timeout_s:g}s ({first_line(e)}); see rank 0's log"
                              ) from None
        if answer != "ok":
            raise LaunchError(answer)
        return
    deadline = time.monotonic() + timeout_s
    while not store.check(joined):
        if store.check([conflict]):  # a rank that disagrees with this launch said so: end every rank now
            message = store.get(conflict).decode()
            store.set(verdict, message)
            _linger(store, info.world_size)
            raise LaunchError(message)
        if time.monotonic() > deadline:
            missing = [r for r in range(info.world_size) if not store.check([joined[r]])]
            message = (f"{rank_list(missing)} of {info.world_size} did not join the rendezvous at "
                       f"{info.master_addr}:{info.master_port} within distributed.timeout_s={timeout_s:g}s "
                       f"({info.world_size - len(missing)} did). Check that they started (their logs), that "
                       f"{info.master_addr} is reachable from their hosts, and that all were given the same "
                       f"MASTER_ADDR/MASTER_PORT")
            store.set(verdict, message)
            raise LaunchError(message)
        time.sleep(0.05)
    store.set(verdict, "ok")
    logger.info("rendezvous: all %d ranks joined at %s:%d", info.world_size, info.master_addr, info.master_port)


def _linger(store: Any, world_size: int, seconds: float = 2.0) -> None:
    """Rank 0 serves the store: keep it up a moment after a failed verdict, so the ranks waiting on it read the
    reason instead of a closed connection."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        joined = sum(store.check([f"{KEY}joined/{r}"]) for r in range(1, min(world_size, 64)))
        if store.add(f"{KEY}verdict_read", 0) >= joined:
            return
        time.sleep(0.05)


def _check_launch_agrees(store: Any, info: LaunchInfo, timeout_s: float, conflict: str) -> None:
    """Every rank has its own RANK and rank 0's WORLD_SIZE; otherwise the rendezvous would wait for ranks that
    never come (until the timeout) or two processes would share one rank."""
    me = f"rank {info.rank} (host {info.hostname}, pid {os.getpid()})"
    problem = None
    if store.add(f"{KEY}claims/{info.rank}", 1) > 1:
        problem = (f"{me}: another process already joined as rank {info.rank}; two processes were given "
                   f"RANK={info.rank} (check the launcher's rank assignment, or a second job using the same "
                   f"MASTER_ADDR:MASTER_PORT)")
    elif info.rank == 0:
        store.set(f"{KEY}world_size", str(info.world_size))
    else:
        try:
            store.wait([f"{KEY}world_size"], timedelta(seconds=timeout_s + 5))
        except Exception as e:  # noqa: BLE001
            raise LaunchError(f"{me}: rank 0 did not open the rendezvous at {info.master_addr}:{info.master_port} "
                              f"within {timeout_s:g}s ({first_line(e)}); see rank 0's log") from None
        world0 = int(store.get(f"{KEY}world_size").decode())
        if world0 != info.world_size:
            problem = (f"{me}: WORLD_SIZE={info.world_size} here but rank 0 has WORLD_SIZE={world0}; every rank "
                       f"must be launched with the same world size (check the launcher's environment)")
    if problem is not None:
        store.set(conflict, problem)
        raise LaunchError(problem)
