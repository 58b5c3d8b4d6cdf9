"""Run a function on N processes over gloo: the one helper behind every multi-process test.

``run_distributed(fn, 4, arg)`` spawns 4 processes, initialises a gloo process group
in each (rank r of 4, on 127.0.0.1 with a free port), calls ``fn(arg)`` and returns
the per-rank results in rank order. A rank that raises makes the whole call raise
with that rank's traceback; a rank that does not finish within ``timeout_s`` is
killed and reported, so a deadlock fails the test instead of hanging the suite.
"""

from __future__ import annotations

import os
import queue
import traceback
from datetime import timedelta
from typing import Any, Callable

from megatrain.launch.discover import free_port


def _worker(fn: Callable, rank: int, world: int, port: int, args: tuple, env: dict, q: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    os.environ.update(env)
    torch.set_num_threads(1)  # N ranks share few cores; oversubscription makes gloo tests crawl
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
        q.put((rank, "ok", fn(*args)))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        q.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 300,
                    env: dict | None = None) -> list[Any]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, env or {}, q), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = q.get(timeout=timeout_s)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    except queue.Empty:
        missing = sorted(set(range(world_size)) - set(results))
        errors.append(f"ranks {missing} did not finish within {timeout_s:.0f} s (deadlock or hang)")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
