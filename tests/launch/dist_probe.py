"""A tiny stand-in for the training entry point: init_distributed + one all-reduce, result as JSON.

Launch it with torchrun, srun, mpirun or the deepspeed launcher; every rank writes
``OUT/rank<R>.json``. Fault injection for the timeout tests:
``--sleep-before-init R:S`` (rank R never joins for S seconds) and
``--sleep-before-preflight R:S`` (rank R joins, then hangs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, when run as a file

from megatrain.launch import preflight, rendezvous  # noqa: E402
from megatrain.config import DistributedConfig  # noqa: E402

RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def env_rank() -> int:
    for name in RANK_VARS:
        if os.environ.get(name):
            return int(os.environ[name])
    return 0


def fault(spec: str | None) -> float:
    if not spec:
        return 0.0
    rank, seconds = spec.split(":")
    return float(seconds) if int(rank) == env_rank() else 0.0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--preflight-timeout", type=float, default=30)
    p.add_argument("--sleep-before-init")
    p.add_argument("--sleep-before-preflight")
    p.add_argument("--local_rank", type=int)  # the deepspeed launcher appends it
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"[probe r{env_rank()} %(name)s] %(levelname)s %(message)s")
    time.sleep(fault(args.sleep_before_init))
    hang = fault(args.sleep_before_preflight)
    if hang:
        real = preflight.preflight
        preflight.preflight = lambda *a, **k: (time.sleep(hang), real(*a, **k))[1]
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    cfg = DistributedConfig(backend="auto", timeout_s=args.timeout, preflight_timeout_s=args.preflight_timeout)
    info = rendezvous.init_distributed(cfg, "cpu").info
    x = torch.tensor([float(info.rank)])
    dist.all_reduce(x)
    result = {"rank": info.rank, "local_rank": info.local_rank, "world_size": info.world_size,
              "local_world_size": info.local_world_size, "method": info.method, "hostname": info.hostname,
              "master_addr": info.master_addr, "master_port": info.master_port, "sum": x.item(),
              "socket_hostname": socket.gethostname(), "env": {k: os.environ.get(k) for k in
                                                               ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                "MASTER_PORT")}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{info.rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
