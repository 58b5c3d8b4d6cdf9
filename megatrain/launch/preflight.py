"""Can the ranks talk? A small all-reduce with its own timeout, then a hosts/devices report."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from datetime import timedelta
from typing import Any, Optional

from megatrain.launch.discover import LaunchError
from megatrain.launch.text import first_line, ranges, rank_list

logger = logging.getLogger(__name__)

KEY = "megatrain/"  # prefix of our keys in the rendezvous store


def preflight(timeout_s: float, store: Any = None, hostname: Optional[str] = None, round_: int = 1) -> None:
    """A small all-reduce that must finish within ``timeout_s``, then a hosts/devices report on rank 0.

    Every rank first records (host, device) in the rendezvous store, so when the all-reduce times
    out or fails the message can say which ranks never arrived, or that all arrived and the
    backend itself is broken. Also refuses two ranks sharing one GPU. ``store`` is the rendezvous store
    (default: the process group's); ``round_`` numbers the check so that each one uses fresh keys.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        raise LaunchError("preflight needs torch.distributed to be initialised; call init_distributed first")
    rank, world, backend = dist.get_rank(), dist.get_world_size(), str(dist.get_backend())
    store = store or _default_store()
    prefix = f"{KEY}preflight/{round_}/"
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    me = {"rank": rank, "host": hostname or socket.gethostname(), "device": _describe_device(device)}
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
        return (f"preflight all-reduce over {backend} failed ({first_line(e)}) and rank 0's store is unreachable: "
                f"rank 0 died; see its log")
    if missing:
        return (f"preflight all-reduce over {backend} did not finish within distributed.preflight_timeout_s="
                f"{timeout_s:g}s: {rank_list(missing)} of {world} never reached it (they joined the "
                f"rendezvous, then hung or crashed; see their logs). Error: {first_line(e)}")
    hint = ("set NCCL_DEBUG=INFO and check NCCL_SOCKET_IFNAME / NCCL_IB_HCA (the interfaces the hosts share)"
            if backend == "nccl" else "set GLOO_SOCKET_IFNAME to an interface every host can reach")
    return (f"preflight all-reduce over {backend} failed although all {world} ranks reached it, so the backend "
            f"cannot move data between them ({first_line(e)}); {hint}")


def _check_report(store: Any, prefix: str, rank: int, world: int, backend: str, ms: float, timeout_s: float) -> None:
    """Rank 0 reads everyone's (host, device), checks for shared GPUs, tells the others, logs a report."""
    verdict = prefix + "verdict"
    if rank != 0:
        try:
            store.wait([verdict], timedelta(seconds=timeout_s))
            answer = store.get(verdict).decode()
        except Exception as e:  # noqa: BLE001
            raise LaunchError(f"rank {rank}: rank 0 did not finish the preflight report within {timeout_s:g}s "
                              f"({first_line(e)}); see rank 0's log") from None
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
        logger.info("  %s: ranks %s; %s", host, ranges([e["rank"] for e in items]), _devices_line(items))


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
    return f"cuda:{ranges([d['index'] for d in devices if d['type'] == 'cuda'])} " + ", ".join(names)
