"""The README's "Training your own model" commands, run as written (parsed from README.md itself),
at small sizes: a tiny corpus, a tiny vocabulary, the debug model and a few steps. Only counts
(vocabulary, workers, GPUs) are scaled down and size overrides appended to the training commands,
so a path, a flag or a file name in the README that no longer matches the tools fails here."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Appended to every command that trains: the 1.1B config becomes the debug model for 4 steps.
SMALL = ["model.preset=debug", "model.vocab_size=300", "train.seq_len=32", "train.micro_batch_size=2",
         "train.global_batch_size=4", "train.max_steps=4", "train.precision=fp32", "logging.interval=1",
         "logging.wandb_project=null", "eval.interval=2", "eval.steps=1", "checkpoint.interval=2"]
# Counts scaled to a 2-core machine and a corpus of a few hundred lines.
SCALE = {"--vocab-size": "300", "--workers": "1", "--num_gpus": "1", "--nproc_per_node": "1"}


def readme_commands(section: str = "## Training your own model") -> list[str]:
    """The shell commands of the first ``bash`` block after ``section``: continuations joined, comments dropped."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text[text.index(section):], re.S).group(1)
    cmds, cur = [], ""
    for line in block.splitlines():
        line = line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
        cur += line
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip():
            cmds.append(cur.strip())
        cur = ""
    return cmds


def small(cmd: str) -> list[str]:
    argv = shlex.split(cmd)
    for i, a in enumerate(argv[:-1]):
        if a in SCALE:
            argv[i + 1] = SCALE[a]
    if "megatrain.train" in argv and "--dry-run" not in argv:
        argv += SMALL
        if argv[0] == "torchrun":  # the launchers are alternatives: the second one gets its own run
            argv += ["run.dir=runs/torchrun-alternative"]
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] == "deepspeed":  # its launcher, with a port of its own (parallel test runs)
        argv[:1] = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", _free_port()]
    elif argv[0] == "torchrun":
        argv[:1] = [sys.executable, "-m", "torch.distributed.run", "--master-port", _free_port()]
    elif argv[0].startswith("megatrain-"):
        argv[:1] = [sys.executable, "-m", {"megatrain-train": "megatrain.train",
                                           "megatrain-convert": "megatrain.convert.cli"}[argv[0]]]
    return argv


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _corpus(path: Path, n: int = 400) -> None:
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ten", "ra", "su", "vo", "ne", "pi", "dar", "el", "on", "is", "qu", "th", "ex"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))}) + "\n")


def test_readme_training_commands_run_as_written(tmp_path):
    cmds = readme_commands()
    assert any("preprocess_data.py" in c for c in cmds) and any("megatrain-convert" in c for c in cmds)
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    shutil.copytree(REPO / "tools", tmp_path / "tools")  # `python tools/X.py` from the user's directory
    _corpus(tmp_path / "corpus.jsonl")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    for cmd in cmds:
        res = subprocess.run(small(cmd), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"README command failed: {cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert (tmp_path / "runs/tinyllama-1.1b/metrics.png").is_file()
    assert (tmp_path / "out/tinyllama-hf/model.safetensors").is_file()
    assert (tmp_path / "out/tinyllama.gguf").stat().st_size > 0
