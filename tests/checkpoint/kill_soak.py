"""Many more kill -9 trials than CI runs (not collected by pytest).

    python tests/checkpoint/kill_soak.py --trials 50 [--steps 16] [--world 2] [--seed 7] [--keep DIR]

Each trial trains a tiny model in a fresh run directory and kills it 1-4 times: at a random step
plus a random delay (mid-step, mid-save, between), or, with probability --crash-prob, at a random
point inside a save (MEGATRAIN_TEST_CRASH_AT). Every restart auto-resumes. A trial passes when every
logged loss equals the uninterrupted reference run's and the final checkpoint's weights and
optimizer state are bitwise equal. Prints one line per failure and a summary; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatrain.checkpoint.save import SAVE_PHASES  # noqa: E402
from tests.checkpoint.conftest import (checkpoint_tensors, loss_records, run_args, run_to_end, start_ranks,  # noqa: E402
                                       wait_for_step)
from tests.checkpoint.zygote import Zygote  # noqa: E402
from tests.conftest import build_pattern_dataset  # noqa: E402


def _interrupt(z: Zygote, args: list[str], run: Path, log: Path, rng: random.Random, steps: int, world: int,
               crash_prob: float) -> str:
    """One interrupted segment; returns what was done (for the failure report)."""
    if rng.random() < crash_prob:
        phase, step = rng.choice(SAVE_PHASES), rng.randint(1, steps - 1)
        pids = start_ranks(z, args, log, world, {"MEGATRAIN_TEST_CRASH_AT": f"{phase}@{step}"})
        codes = [z.wait(p, 300) for p in pids]  # a rank left waiting for a crashed peer ends by its timeout
        return f"crash {phase}@{step} -> {codes}"
    k = rng.randint(1, steps - 1)
    before = len(loss_records(run))
    pids = start_ranks(z, args, log, world)
    try:
        wait_for_step(run, k, before, z, pids, timeout=300)
    except AssertionError:  # already past k (it resumed later than k) and finished: fine
        pass
    time.sleep(rng.uniform(0, 0.3))
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    codes = [z.wait(p, 60) for p in pids]
    return f"kill at step>={k} -> {codes}"


def _trial(z: Zygote, data: str, root: Path, ref: dict, i: int, rng: random.Random, opts) -> str | None:
    run, log = root / f"trial{i:03d}", root / f"trial{i:03d}.log"
    args = run_args(data, run, steps=opts.steps)
    done = [_interrupt(z, args, run, log, rng, opts.steps, opts.world, opts.crash_prob)
            for _ in range(rng.randint(1, 4))]
    codes = run_to_end(z, args, log, world=opts.world, timeout=600)
    if codes != [0] * opts.world:
        return f"final run exited {codes} after {done}"
    wrong = [(s, x) for s, x in loss_records(run) if x != ref["losses"][s]]
    if wrong:
        return f"losses differ at {wrong[:3]} after {done}"
    final = checkpoint_tensors(run / "checkpoints" / f"step_{opts.steps:08d}")
    import torch

    if sorted(final) != sorted(ref["final"]) or any(not torch.equal(final[k], ref["final"][k]) for k in final):
        return f"final weights differ after {done}"
    if not opts.keep:
        shutil.rmtree(run, ignore_errors=True)
        log.unlink(missing_ok=True)
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--crash-prob", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--keep", action="store_true", help="keep every trial's run directory and log")
    opts = p.parse_args()
    seed = opts.seed if opts.seed is not None else time.time_ns() % 10**6
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="megatrain-soak-"))
    data = build_pattern_dataset(str(root / "pattern"))
    failures = []
    started = time.time()
    with Zygote() as z:
        ref_run = root / "reference"
        if run_to_end(z, run_args(data, ref_run, steps=opts.steps), root / "reference.log", opts.world) != \
                [0] * opts.world:
            sys.stdout.write(f"reference run failed; see {root / 'reference.log'}\n")
            return 1
        ref = {"losses": dict(loss_records(ref_run)),
               "final": checkpoint_tensors(ref_run / "checkpoints" / f"step_{opts.steps:08d}")}
        for i in range(opts.trials):
            err = _trial(z, data, root, ref, i, rng, opts)
            if err:
                failures.append(err)
                sys.stdout.write(f"trial {i}: FAILED: {err} (log: {root / f'trial{i:03d}.log'})\n")
            sys.stdout.flush()
    sys.stdout.write(f"kill soak: {opts.trials - len(failures)}/{opts.trials} trials exact, world {opts.world}, "
                     f"{opts.steps} steps, seed {seed}, {time.time() - started:.0f} s; work dir {root}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
