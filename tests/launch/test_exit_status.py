"""torchrun exits 1 when its workers exit 75; the exit_status wrapper gives back the workers' code."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatrain.launch import exit_status

WORKER = ("import os, sys; from megatrain.launch.exit_status import record; "
          "code = int(sys.argv[1]) if os.environ['RANK'] == '0' else int(sys.argv[2]); record(code); sys.exit(code)")


def _env():
    return {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("codes,want", [((75, 75), 75), ((2, 75), 2)])
def test_torchrun_workers_code_is_kept(tmp_path, codes, want):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
           "--no-python", sys.executable, str(script), *map(str, codes)]
    if codes == (75, 75):  # once, the plain launcher: it loses the code (documented)
        assert subprocess.run(cmd, env=_env(), capture_output=True).returncode == (1 if want else 0)
    wrapped = subprocess.run([sys.executable, "-m", "megatrain.launch.exit_status", "--", *cmd], env=_env(),
                             capture_output=True, text=True)
    assert wrapped.returncode == want, wrapped.stderr[-2000:]


def test_resolve_rule():
    assert exit_status.resolve(1, [("rank-0", 75), ("rank-1", 75)]) == 75
    assert exit_status.resolve(1, [("rank-1", 3), ("rank-0", 75)]) == 3
    assert exit_status.resolve(137, []) == 137  # killed before any worker wrote
    assert exit_status.REQUEUE == __import__("megatrain.trainer", fromlist=["x"]).REQUEUE_EXIT_CODE


def test_megatrain_train_records_its_code(tmp_path):
    env = {**_env(), exit_status.ENV: str(tmp_path), "RANK": "0"}
    res = subprocess.run([sys.executable, "-m", "megatrain.train", "train.no_such_key=1"], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 2 and (tmp_path / "rank-0").read_text().strip() == "2"
