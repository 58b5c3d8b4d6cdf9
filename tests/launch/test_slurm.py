"""slurm/ scripts against a real one-node Slurm cluster (.ci/setup_services.sh starts it)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from tests.launch.conftest import (PROBE, REPO, assert_same_losses, clean_env, debug_train_args, excerpt, run,
                                   train_losses, wait_for)

TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"
CPU_JOB = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=15"]


def job_env(log_dir: Path, **extra: str) -> dict:
    return clean_env(MEGATRAIN_LOG_DIR=str(log_dir), MEGATRAIN_PYTHON=sys.executable, **extra)


def job_log(tmp_path: Path) -> str:
    logs = sorted(tmp_path.glob("job-*.out"))
    assert len(logs) == 1, f"expected one job log in {tmp_path}, found {logs}"
    return logs[0].read_text()


def describe_failure(tmp_path: Path, logs: Path) -> str:
    parts = [f"--- {p.name}\n{excerpt(p.read_text(), 3000)}" for p in sorted(tmp_path.glob("job-*.out"))]
    parts += [f"--- {p.name}\n{excerpt(p.read_text(), 3000)}" for p in sorted(logs.glob("*.log"))]
    return "\n".join(parts)


def test_scripts_parse_and_agree_on_the_requeue_code():
    from megatrain.trainer import REQUEUE_EXIT_CODE

    for script in sorted((REPO / "slurm").glob("*.s*")):
        subprocess.run(["bash", "-n", script], check=True)
    assert f"REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE} " in TRAIN_SBATCH.read_text()


def test_sbatch_trains_two_cpu_tasks(tmp_path, slurm, torchrun_reference):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    res = run(["sbatch", "--wait", *CPU_JOB, f"--output={tmp_path}/job-%j.out", TRAIN_SBATCH,
               *debug_train_args(run_dir)], timeout=400, env=job_env(logs))
    assert res.returncode == 0, res.stdout + describe_failure(tmp_path, logs)
    text = job_log(tmp_path)
    assert "on 1 node(s)" in text and "launcher srun" in text and "training finished" in text
    rank0 = (logs / "rank-0.log").read_text()
    assert "found by slurm: srun step" in rank0
    assert "preflight ok: 2 rank(s) on 1 host(s)" in rank0 and "done: 4 steps" in rank0
    assert (logs / "rank-1.log").is_file()
    assert_same_losses(train_losses(run_dir), torchrun_reference, "sbatch (srun) vs torchrun")
    assert (run_dir / "checkpoints").is_dir()


def test_sbatch_failure_is_reported_with_the_exit_code(tmp_path, slurm):
    logs = tmp_path / "logs"
    res = run(["sbatch", "--wait", *CPU_JOB, f"--output={tmp_path}/job-%j.out", TRAIN_SBATCH,
               "model.preset=debug", "train.no_such_key=1", f"run.dir={tmp_path}/run"], timeout=300, env=job_env(logs))
    assert res.returncode == 2, res.stdout + describe_failure(tmp_path, logs)
    text = job_log(tmp_path)
    assert "training failed with exit code 2" in text and "train.no_such_key: unknown key" in text
    assert re.search(r"rank [01] failed first, with exit code 2", text) or "srun reported" not in text, text


def test_srun_with_inconsistent_world_size_fails_fast(tmp_path, slurm):
    res = run(["srun", "--ntasks=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=5", "--kill-on-bad-exit=1",
               "--export=ALL,WORLD_SIZE=4", sys.executable, PROBE, "--out", tmp_path], timeout=180)
    assert res.returncode != 0
    assert "WORLD_SIZE=4 disagrees with Slurm's SLURM_NTASKS=2" in res.stdout, excerpt(res.stdout)
    assert "unset WORLD_SIZE" in res.stdout


def _controller_log(job_id: str) -> str:
    """slurmctld's log lines about one job (why a start was refused, say), for failure messages."""
    res = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True)
    found = re.search(r"^SlurmctldLogFile\s*=\s*(\S+)", res.stdout, re.M)
    path = Path(found.group(1)) if found else None
    if path is None or not path.is_file():
        return "(slurmctld log not found)"
    mine = re.compile(rf"JobId={job_id}\b")
    return "\n".join([ln for ln in path.read_text(errors="replace").splitlines() if mine.search(ln)][-20:])


def _job_state(job_id: str) -> dict:
    res = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    if res.returncode != 0:  # purged: finished more than MinJobAge seconds ago
        return {"JobState": "GONE"}
    return dict(re.findall(r"(\w+)=(\S+)", res.stdout))


def test_preempted_job_saves_requeues_and_resumes(tmp_path, slurm):
    """SIGUSR1 (what --signal sends before the time limit) -> checkpoint + exit 75 -> requeue -> resume.

    Polls the job instead of `sbatch --wait`, which can return while the job is being requeued.
    """
    from megatrain.trainer import REQUEUE_EXIT_CODE

    steps = 40
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    res = run(["sbatch", "--parsable", *CPU_JOB, f"--output={tmp_path}/job-%j.out", TRAIN_SBATCH,
               *debug_train_args(run_dir, steps)], timeout=60, env=job_env(logs))
    job_id = res.stdout.strip().split(";")[0]
    assert res.returncode == 0 and job_id.isdigit(), res.stdout
    try:
        metrics = run_dir / "metrics.jsonl"
        wait_for(lambda: metrics.is_file() and '"step": 2,' in metrics.read_text(), 300, "step 2 of the first run")
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
        wait_for(lambda: (s := _job_state(job_id)).get("Restarts") == "1" and s.get("JobState") == "PENDING",
                 120, f"job {job_id} to be requeued (does the trainer save and exit {REQUEUE_EXIT_CODE} on SIGUSR1?)")
        # Slurm holds a requeued job for about two minutes (BeginTime); the test need not wait that
        # long, but must let a second or two pass: slurmd revoked the job's credential when it ended the
        # first run, at one-second resolution, and rejects a new start of the same job id in that second
        # ("Killing non-startable batch JobId=...: Job credential revoked" in slurmctld.log, exit 1:0).
        time.sleep(2.5)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
        final = wait_for(lambda: (s := _job_state(job_id)).get("JobState") in _FINISHED and s, 300,
                         f"job {job_id} to finish after the requeue")
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    text = job_log(tmp_path)
    if final["JobState"] != "GONE":  # else the job log below must tell
        assert (final["JobState"], final["ExitCode"], final["Restarts"]) == ("COMPLETED", "0:0", "1"), \
            f"{describe_failure(tmp_path, logs)}\n--- slurmctld on job {job_id}\n{_controller_log(job_id)}"
    assert f"asked to be requeued (exit {REQUEUE_EXIT_CODE}); requeueing job {job_id}" in text
    assert "(restart 1)" in text and "training finished" in text
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, steps + 1)), "the resumed run must continue, not restart"
    rank0 = (logs / "rank-0.log").read_text()  # both runs append to it
    saved = re.findall(r"saved checkpoint (\S+step_(\d+))", rank0)
    assert len(saved) == 2 and 2 <= int(saved[0][1]) < steps and int(saved[1][1]) == steps, saved
    assert f"resumed from {saved[0][0]}: step {int(saved[0][1])}" in rank0


_FINISHED = ("GONE", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
             "DEADLINE")


def _write_jsonl(path: Path, n: int) -> None:
    import json
    import random

    rng = random.Random(0)
    words = "the model reads tokens and the data flows through shards into one merged corpus".split()
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 40)))}) + "\n")


def test_preprocess_array_job_then_dependent_merge(tmp_path, slurm):
    """3 array tasks tokenize one shard each; the merge job waits for them; the result equals one run."""
    from megatrain.data.demo import prepare_demo
    from tests.launch.conftest import DATA_CACHE

    _, tokenizer = prepare_demo(str(DATA_CACHE / "demo"))
    corpus = tmp_path / "in.jsonl"
    _write_jsonl(corpus, 300)
    tool_args = ["--input", corpus, "--tokenizer-model", tokenizer, "--append-eod"]
    env = clean_env(MEGATRAIN_PYTHON=sys.executable)
    res = run([REPO / "slurm" / "submit_preprocess.sh", "--shards", "3", "--output-prefix", tmp_path / "out" / "corpus",
               "--log-dir", tmp_path / "logs", "--sbatch", "--cpus-per-task=1 --time=5", "--", *tool_args],
              timeout=60, env=env)
    assert res.returncode == 0, res.stdout
    array_id, merge_id = res.stdout.split()[-2:]

    def queued() -> str:
        return subprocess.run(["squeue", "-h", "-j", f"{array_id},{merge_id}"], capture_output=True,
                              text=True).stdout.strip()

    wait_for(lambda: not queued(), 300, f"jobs {array_id} (array) and {merge_id} (merge) to finish")
    logs = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted((tmp_path / "logs").glob("*.out")))
    assert (tmp_path / "out" / "corpus.idx").is_file(), logs
    assert len(list((tmp_path / "logs").glob("megatrain-preprocess-*.out"))) == 3, logs
    assert "merge_datasets: 3 datasets" in logs and "300 documents" in logs
    single = run([sys.executable, REPO / "tools" / "preprocess_data.py", *tool_args, "--output-prefix",
                  tmp_path / "one" / "corpus", "--no-progress"], timeout=120, env=env)
    assert single.returncode == 0, single.stdout
    for ext in (".bin", ".idx"):
        assert (tmp_path / "out" / f"corpus{ext}").read_bytes() == (tmp_path / "one" / f"corpus{ext}").read_bytes()
