#!/usr/bin/env python
"""The bad-input audit (issue 16): run every case for real, as a user would, and check the three promises.

    PYTHONPATH=. python tests/audit/bad_inputs.py [--only SUBSTRING] [--table docs/bad-inputs-table.md]

Each case is one command (a tool or megatrain-train) in a scratch directory holding a small corpus, a
tokenizer, a dataset, a checkpoint and a run. A case passes when the command ends within its time limit
(no hang), prints no Python traceback, exits with the expected code, prints the expected words, and leaves
every file that existed before exactly as it was (nothing lost, nothing half-written; new files only where
the case allows). Not part of the CI suite (about 5 minutes on 2 busy cores); the table it writes is
docs/bad-inputs.md's.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
TOOLS = REPO / "tools"
TRAIN = [PY, "-m", "megatrain.train"]
CONVERT = [PY, "-m", "megatrain.convert.cli"]
TINY = ["model.preset=debug", "train.max_steps=1", "train.seq_len=16", "train.micro_batch_size=2",
        "train.precision=fp32", "eval.steps=1", "logging.interval=1"]


@dataclasses.dataclass
class Case:
    tool: str
    what: str
    argv: Callable[[Path], list]  # scratch dir -> command
    code: int
    words: str
    setup: Optional[Callable[[Path], None]] = None
    timeout: float = 180.0
    may_create: tuple = ()  # paths (relative to the scratch dir) the command may create


def tool(name: str, *args) -> Callable[[Path], list]:
    return lambda d: [PY, str(TOOLS / f"{name}.py"), *[a(d) if callable(a) else a for a in args]]


def at(rel: str) -> Callable[[Path], str]:
    return lambda d: str(d / rel)


def write(rel: str, data) -> Callable[[Path], None]:
    def go(d: Path) -> None:
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return go


def train(*args) -> Callable[[Path], list]:
    return lambda d: [*TRAIN, f"run.dir={d / 'runs' / 'r'}", f"data.path={d / 'ds'}", f"data.tokenizer={d / 'tok.model'}",
                      "data.split=8,2,0", *TINY, *[a(d) if callable(a) else a for a in args]]


def dry(*args) -> Callable[[Path], list]:
    return lambda d: [*TRAIN, "--dry-run", *TINY, *[a(d) if callable(a) else a for a in args]]


def convert(*args) -> Callable[[Path], list]:
    return lambda d: [*CONVERT, *[a(d) if callable(a) else a for a in args]]


PRE = ("preprocess_data",)


def pre(*args):
    return tool("preprocess_data", "--no-progress", "--tokenizer-model", at("tok.model"), *args)


CASES = [
    # ---------------------------------------------------------------- preprocess_data
    Case("preprocess_data", "--input a file that does not exist",
         pre("--input", at("nope.jsonl"), "--output-prefix", at("o/x")), 1, "nope.jsonl: no such file"),
    Case("preprocess_data", "--input an empty directory",
         pre("--input", at("emptydir"), "--output-prefix", at("o/x")), 1, "no input files found",
         setup=lambda d: (d / "emptydir").mkdir()),
    Case("preprocess_data", "--tokenizer-model a text file",
         tool("preprocess_data", "--no-progress", "--tokenizer-model", at("corpus.jsonl"), "--input", at("corpus.jsonl"),
              "--output-prefix", at("o/x")), 1, "not a SentencePiece model"),
    Case("preprocess_data", "--tokenizer-model missing",
         tool("preprocess_data", "--no-progress", "--tokenizer-model", at("none.model"), "--input", at("corpus.jsonl"),
              "--output-prefix", at("o/x")), 1, "no such tokenizer model file"),
    Case("preprocess_data", "--workers 0", pre("--input", at("corpus.jsonl"), "--output-prefix", at("o/x"),
                                               "--workers", "0"), 1, "--workers 0: must be at least 1"),
    Case("preprocess_data", "--partition 3 --num-partitions 2",
         pre("--input", at("corpus.jsonl"), "--output-prefix", at("o/x"), "--partition", "3", "--num-partitions", "2"),
         1, "need 0 <= partition < num_partitions"),
    Case("preprocess_data", "--json-keys naming a key no record has",
         pre("--input", at("corpus.jsonl"), "--output-prefix", at("o/x"), "--json-keys", "body"), 1,
         "no documents to write", may_create=("o",)),
    Case("preprocess_data", "an empty input file", pre("--input", at("empty.jsonl"), "--output-prefix", at("o/x")), 1,
         "no documents to write", setup=write("empty.jsonl", ""), may_create=("o",)),
    Case("preprocess_data", "a damaged .gz input", pre("--input", at("bad.jsonl.gz"), "--output-prefix", at("o/x")), 1,
         "not a readable gzip file", setup=write("bad.jsonl.gz", b"\x1f\x8b\x08\x00garbage")),
    Case("preprocess_data", "a UTF-16 text file", pre("--input", at("u16.txt"), "--output-prefix", at("o/x")), 1,
         "not a text file", setup=write("u16.txt", "hello world\n".encode("utf-16"))),
    Case("preprocess_data", "--output-prefix under a regular file",
         pre("--input", at("corpus.jsonl"), "--output-prefix", at("corpus.jsonl/x")), 1, "part of that path is a file"),
    Case("preprocess_data", "--strict and a malformed record",
         pre("--input", at("mixed.jsonl"), "--output-prefix", at("o/x"), "--strict"), 1, "mixed.jsonl:2: bad JSON",
         setup=write("mixed.jsonl", '{"text": "ok"}\n{"text": \n'), may_create=("o",)),
    Case("preprocess_data", "--text-unit page", pre("--input", at("corpus.jsonl"), "--output-prefix", at("o/x"),
                                                    "--text-unit", "page"), 2, "invalid choice: 'page'"),
    Case("preprocess_data", "--output-prefix a directory name ending in .json's stem (o.json is a directory)",
         pre("--input", at("corpus.jsonl"), "--output-prefix", at("odir")), 1, "odir.json is a directory",
         setup=lambda d: (d / "odir.json").mkdir()),
    # ---------------------------------------------------------------- train_tokenizer
    Case("train_tokenizer", "--vocab-size 2000000",
         tool("train_tokenizer", "--input", at("corpus.jsonl"), "--vocab-size", "2000000", "--output-prefix", at("t")),
         1, "meant for vocabularies up to"),
    Case("train_tokenizer", "--vocab-size 270 (above the minimum, below what the text needs)",
         tool("train_tokenizer", "--input", at("corpus.jsonl"), "--vocab-size", "262", "--output-prefix", at("t"),
              "--num-threads", "1"), 1, "raise --vocab-size above"),
    Case("train_tokenizer", "--input with no usable text (wrong --json-keys)",
         tool("train_tokenizer", "--input", at("corpus.jsonl"), "--vocab-size", "300", "--output-prefix", at("t"),
              "--json-keys", "body"), 1, "no usable text"),
    Case("train_tokenizer", "--output-prefix whose .model is a user's file",
         tool("train_tokenizer", "--input", at("corpus.jsonl"), "--vocab-size", "300", "--output-prefix", at("notes")),
         1, "notes.model exists and is not a SentencePiece model", setup=write("notes.model", "my notes")),
    Case("train_tokenizer", "--model-type word", tool("train_tokenizer", "--input", at("corpus.jsonl"), "--vocab-size",
                                                      "300", "--output-prefix", at("t"), "--model-type", "word"),
         2, "invalid choice: 'word'"),
    Case("train_tokenizer", "--input a binary file named .txt",
         tool("train_tokenizer", "--input", at("blob.txt"), "--vocab-size", "300", "--output-prefix", at("t")), 1,
         "not a text file", setup=write("blob.txt", bytes(range(256)) * 8)),
    # ---------------------------------------------------------------- merge_datasets
    Case("merge_datasets", "--input a directory without .idx files",
         tool("merge_datasets", "--input", at("emptydir"), "--output-prefix", at("m")), 1, "holds no .idx files",
         setup=lambda d: (d / "emptydir").mkdir()),
    Case("merge_datasets", "a shard whose .bin is truncated",
         tool("merge_datasets", "--input", at("ds"), at("cut"), "--output-prefix", at("m")), 1, "is truncated",
         setup=lambda d: _cut_copy(d)),
    Case("merge_datasets", "a shard whose sidecar is not JSON",
         tool("merge_datasets", "--input", at("ds"), at("badside"), "--output-prefix", at("m")), 1,
         "sidecar is not readable JSON", setup=lambda d: _bad_sidecar(d)),
    Case("merge_datasets", "shards of two tokenizers", tool("merge_datasets", "--input", at("ds"), at("other"),
                                                           "--output-prefix", at("m")), 1,
         "shards must come from the same tokenizer", setup=lambda d: _other_tokenizer(d)),
    Case("merge_datasets", "--output-prefix the input, spelled ./", lambda d: [
        PY, str(TOOLS / "merge_datasets.py"), "--input", str(d / "ds"), "--output-prefix", f"{d}/./ds"], 1,
        "is the input"),
    # ---------------------------------------------------------------- inspect_data
    Case("inspect_data", "verify a prefix that does not exist", tool("inspect_data", "verify", at("nothing")), 1,
         "no such file"),
    Case("inspect_data", "verify an .idx cut short", tool("inspect_data", "verify", at("cutidx")), 1, "truncated",
         setup=lambda d: _cut_idx(d)),
    Case("inspect_data", "decode --document -1", tool("inspect_data", "decode", at("ds"), "--document", "-1",
                                                      "--tokenizer-model", at("tok.model")), 1, "--document -1: must be in"),
    Case("inspect_data", "verify --vocab-size 0", tool("inspect_data", "verify", at("ds"), "--vocab-size", "0"), 1,
         "--vocab-size 0: must be positive"),
    # ---------------------------------------------------------------- megatrain-convert
    Case("megatrain-convert", "input that does not exist", convert(at("nope"), at("out"), "--to", "hf"), 2,
         "no such file or directory"),
    Case("megatrain-convert", "--tp 0", convert(at("ck"), at("out"), "--to", "megatrain", "--tp", "0"), 2,
         "sizes must be >= 1"),
    Case("megatrain-convert", "--to gguf --dtype bf16", convert(at("ck"), at("m.gguf"), "--to", "gguf", "--dtype",
                                                                 "bf16"), 2, "GGUF takes --outtype"),
    Case("megatrain-convert", "--atol -1", convert(at("ck"), at("out"), "--to", "hf", "--atol", "-1"), 2,
         "tolerances must be >= 0"),
    Case("megatrain-convert", "--tokenizer a text file", convert(at("ck"), at("out"), "--to", "hf", "--tokenizer",
                                                                  at("corpus.jsonl")), 2, "corpus.jsonl"),
    Case("megatrain-convert", "an HF directory whose config.json is not JSON",
         convert(at("hfbad"), at("out"), "--to", "megatrain"), 2, "config.json",
         setup=lambda d: (write("hfbad/config.json", "{not json")(d), write("hfbad/model.safetensors", b"\0" * 16)(d))),
    Case("megatrain-convert", "--max-shard-size 5XB", convert(at("ck"), at("out"), "--to", "hf", "--max-shard-size",
                                                               "5XB", "--no-verify"), 2, "5XB"),
    Case("megatrain-convert", "--verify-prompts 0", convert(at("ck"), at("out"), "--to", "hf", "--verify-prompts", "0"),
         2, "--verify-prompts and --verify-tokens must be >= 1"),
    Case("megatrain-convert", "--overwrite onto a directory of the user's files",
         convert(at("ck"), at("mine"), "--to", "hf", "--overwrite", "--no-verify"), 2, "megatrain-convert did not write",
         setup=write("mine/thesis.tex", "a year of work")),
    Case("megatrain-convert", "output inside the input checkpoint, --overwrite",
         convert(at("ck"), at("ck/hf"), "--to", "hf", "--overwrite", "--no-verify"), 2, "lies inside the checkpoint"),
    # ---------------------------------------------------------------- plot_metrics
    Case("plot_metrics", "a directory without metrics.jsonl", tool("plot_metrics", at("emptydir")), 2,
         "no such file", setup=lambda d: (d / "emptydir").mkdir()),
    Case("plot_metrics", "metrics.jsonl with no training records", tool("plot_metrics", at("m1")), 2,
         "no training steps recorded", setup=write("m1/metrics.jsonl", '{"step": 1, "eval_loss": 2.0}\n')),
    Case("plot_metrics", "--out the metrics file itself", tool("plot_metrics", at("m2"), "--out", at("m2/metrics.jsonl")),
         2, "give a .png path", setup=lambda d: _metrics(d / "m2")),
    Case("plot_metrics", "--out an existing file that is not a plot",
         tool("plot_metrics", at("m3"), "--out", at("m3/notes.png")), 2, "not a PNG image",
         setup=lambda d: (_metrics(d / "m3"), write("m3/notes.png", "keep")(d))),
    # ---------------------------------------------------------------- megatrain-train: config
    Case("megatrain-train", "an override without '='", dry("train.max_steps"), 2, "overrides are written dotted.key=value"),
    Case("megatrain-train", "--config a directory", dry("--config", at("emptydir")), 2, "is a directory",
         setup=lambda d: (d / "emptydir").mkdir()),
    Case("megatrain-train", "optimizer.min_lr above optimizer.lr", dry("optimizer.lr=1e-4", "optimizer.min_lr=1e-3"), 2,
         "exceeds optimizer.lr"),
    Case("megatrain-train", "hidden size not divisible by heads", dry("model.hidden_size=100", "model.num_heads=3"), 2,
         "not divisible by model.num_heads"),
    Case("megatrain-train", "train.seq_len above model.max_seq_len", dry("train.seq_len=4096"), 2,
         "exceeds model.max_seq_len"),
    Case("megatrain-train", "logging.level=LOUD", dry("logging.level=LOUD"), 2, "logging.level='LOUD'"),
    Case("megatrain-train", "--dry-run --world-size 0", dry("--world-size", "0"), 2, "--world-size 0"),
    Case("megatrain-train", "a YAML list where a section belongs", dry("--config", at("list.yaml")), 2,
         "must be a mapping", setup=write("list.yaml", "- a\n- b\n")),
    Case("megatrain-train", "a YAML tab indentation error", dry("--config", at("tab.yaml")), 2, "not valid YAML",
         setup=write("tab.yaml", "train:\n\tmax_steps: 3\n")),
    Case("megatrain-train", "a string where a number belongs", dry("optimizer.lr=fast"), 2,
         "optimizer.lr: expected a number"),
    Case("megatrain-train", "optimizer.lr=nan", dry("optimizer.lr=.nan"), 2, "must be a finite number"),
    Case("megatrain-train", "a 500-byte YAML alias bomb (issue 16 class 7)", dry("--config", at("bomb.yaml")), 2,
         "expands to more than 100,000 values", setup=lambda d: _bomb(d), timeout=60),
    Case("megatrain-train", "train.max_steps=2**70 (issue 16 class 7)", dry("train.max_steps=1180591620717411303424"),
         2, "train.max_steps=1180591620717411303424: must be in [1, 1000000000]"),
    Case("megatrain-train", "distributed.timeout_s=1e20 (issue 16 class 7)", dry("distributed.timeout_s=1.0e20"), 2,
         "distributed.timeout_s=1e+20: must be in (0, 604800]"),
    # ---------------------------------------------------------------- megatrain-train: start-up
    Case("megatrain-train", "step directories without COMPLETE, train.resume=auto (issue 16 class 4)", train(), 2,
         "holds 1 step directory but no complete checkpoint", setup=lambda d: _step_without_complete(d),
         may_create=("runs/r/.lock",)),
    Case("megatrain-train", "data.path that does not exist", train(lambda d: f"data.path={d / 'nothing'}"), 2,
         "no such file", may_create=("runs",)),
    Case("megatrain-train", "data.tokenizer that does not exist", train(lambda d: f"data.tokenizer={d / 'no.model'}"),
         2, "no such file", may_create=("runs",)),
    Case("megatrain-train", "data.split with four parts", train("data.split=1,2,3,4"), 2, "need 1 to 3 non-negative",
         may_create=("runs",)),
    Case("megatrain-train", "model.vocab_size padded past the tokenizer (512 vs 300): samples draw only real ids",
         train("train.max_steps=2", "eval.sample_tokens=8"), 0, "done: 2 steps", may_create=("runs",)),
    Case("megatrain-train", "deepspeed.template that does not exist", train("deepspeed.template=zero9"), 2,
         "no such template file", may_create=("runs",)),
    Case("megatrain-train", "a template that sets train_batch_size",
         train(lambda d: f"deepspeed.template={d / 'tbs.json'}"), 2, "sets 'train_batch_size'",
         setup=write("tbs.json", '{"train_batch_size": 64}'), may_create=("runs",)),
    Case("megatrain-train", "a template with an elasticity block",
         train(lambda d: f"deepspeed.template={d / 'el.json'}"), 2, "the section 'elasticity'",
         setup=write("el.json", '{"elasticity": {"enabled": true, "max_train_batch_size": 64}}'),
         may_create=("runs",)),
    Case("megatrain-train", "train.resume naming a path that does not exist",
         train(lambda d: f"train.resume={d / 'nowhere'}"), 2, "nowhere", may_create=("runs",)),
    Case("megatrain-train", "parallel.tensor=2 on one process", train("parallel.tensor=2"), 2,
         "not divisible by parallel.tensor", may_create=("runs",)),
    Case("megatrain-train", "model.vocab_size below the tokenizer's", train("model.vocab_size=100"), 2,
         "set model.vocab_size >=", may_create=("runs",)),
    Case("megatrain-train", "a dataset whose .idx was swapped for another of the same size", train(), 2,
         "idx_sha256", setup=lambda d: _swap_idx(d), may_create=("runs",)),
]


# --------------------------------------------------------------------------- fixtures


def _bomb(d: Path) -> None:
    text = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    (d / "bomb.yaml").write_text(text + "eval: {prompts: *i}\n")


def _step_without_complete(d: Path) -> None:
    step = d / "runs" / "r" / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    (step / "manifest.json").write_text('{"files": {}}')


def _metrics(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    rec = {"time": 1.0, "step": 1, "loss": 3.0, "lr": 1e-3, "tokens_per_s": 10.0}
    (d / "metrics.jsonl").write_text(json.dumps(rec) + "\n")


def _copy_ds(d: Path, name: str) -> Path:
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(d / f"ds{ext}", d / f"{name}{ext}")
    return d / name


def _cut_copy(d: Path) -> None:
    p = _copy_ds(d, "cut")
    with open(f"{p}.bin", "rb+") as f:
        f.truncate(os.path.getsize(f"{p}.bin") // 2)
    os.remove(f"{p}.json")


def _cut_idx(d: Path) -> None:
    p = _copy_ds(d, "cutidx")
    with open(f"{p}.idx", "rb+") as f:
        f.truncate(os.path.getsize(f"{p}.idx") - 7)
    os.remove(f"{p}.json")


def _bad_sidecar(d: Path) -> None:
    p = _copy_ds(d, "badside")
    Path(f"{p}.json").write_text("{oops")


def _other_tokenizer(d: Path) -> None:
    p = _copy_ds(d, "other")
    side = json.loads(Path(f"{p}.json").read_text())
    side["tokenizer_sha256"] = "0" * 64
    Path(f"{p}.json").write_text(json.dumps(side))


def _swap_idx(d: Path) -> None:
    from megatrain.data.indexed import IndexedDataset, write_index

    ds = IndexedDataset(str(d / "ds"))
    lengths = ds.sequence_lengths.copy()
    lengths[0], lengths[1] = lengths[0] + 1, lengths[1] - 1  # same size and token count, other boundaries
    tmp = d / "swapped.idx"
    write_index(str(tmp), ds.dtype, lengths, ds.document_indices.copy())
    del ds
    os.replace(tmp, d / "ds.idx")


def build_fixtures(root: Path) -> None:
    """Corpus, tokenizer, dataset and checkpoint shared (copied) by every case."""
    sys.path.insert(0, str(REPO))
    import random

    from megatrain.data.preprocess import PreprocessOptions, preprocess
    from megatrain.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) for _ in range(400)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = train_tokenizer(texts, 300, str(root / "tok"), num_threads=1)
    preprocess(PreprocessOptions(inputs=[str(root / "corpus.jsonl")], output_prefix=str(root / "ds"),
                                 tokenizer_model=tok, append_eod=True, progress=False))
    from megatrain.checkpoint import layout
    from megatrain.config import load_config
    from megatrain.model import build_model

    cfg = load_config(None, ["model.preset=debug", "model.vocab_size=300", "train.precision=fp32"])
    layout.write_weights_only_checkpoint(root / "ck", cfg.to_dict(), build_model(cfg.model, seed=0).state_dict(),
                                         extra_files={"tokenizer.model": Path(tok)})


# --------------------------------------------------------------------------- running


def snapshot(root: Path) -> dict:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = Path(d) / n
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "?"
    return out


def run_case(case: Case, fixtures: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix="audit-"))
    try:
        shutil.copytree(fixtures, work, dirs_exist_ok=True)
        if case.setup:
            case.setup(work)
        before = snapshot(work)
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        t0 = time.monotonic()
        try:
            res = subprocess.run(case.argv(work), cwd=work, env=env, capture_output=True, text=True,
                                 timeout=case.timeout)
            code, out = res.returncode, res.stdout + res.stderr
        except subprocess.TimeoutExpired as e:
            code, out = "hang", (e.stdout or b"").decode() + (e.stderr or b"").decode()
        secs = time.monotonic() - t0
        after = snapshot(work)
        changed = sorted(k for k in before if after.get(k) != before[k])
        allowed = tuple(case.may_create) + (("index-cache/",) if case.tool == "megatrain-train" else ())  # a cache
        created = sorted(k for k in after if k not in before and not k.startswith(allowed or ("\0",)))
        problems = []
        if code == "hang":
            problems.append("hang")
        if "Traceback (most recent call last)" in out:
            problems.append("traceback")
        if code != case.code:
            problems.append(f"exit {code}, expected {case.code}")
        if case.words not in out:
            problems.append(f"message lacks {case.words!r}")
        if changed:
            problems.append(f"changed or removed {changed[:3]}")
        if created:
            problems.append(f"left {created[:3]}")
        message = next((line.strip() for line in out.splitlines() if case.words in line), "")
        if not message:
            message = next((line.strip() for line in reversed(out.splitlines()) if "error" in line.lower()), out[-200:])
        return {"tool": case.tool, "what": case.what, "code": code, "message": message, "problems": problems,
                "seconds": round(secs, 1)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(rows: list[dict], root: str) -> str:
    lines = ["| # | tool | bad input | exit | message (abridged) | kept promises |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        msg = re.sub(r"^\d\d:\d\d:\d\d \[r\d+ [^]]*\] ", "", r["message"])  # the log line's time and rank
        msg = re.sub(re.escape(root) + r"/audit-[a-z0-9_]+/?", "DIR/", msg).replace("|", "\\|")
        msg = msg if len(msg) <= 170 else msg[:167] + "..."
        ok = "yes" if not r["problems"] else "NO: " + "; ".join(r["problems"])
        lines.append(f"| {i} | {r['tool']} | {r['what']} | {r['code']} | `{msg}` | {ok} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="run the cases whose description contains this")
    p.add_argument("--table", type=Path, help="write the markdown table here")
    args = p.parse_args(argv)
    cases = [c for c in CASES if args.only in c.what or args.only in c.tool]
    fixtures = Path(tempfile.mkdtemp(prefix="audit-fixtures-"))
    try:
        build_fixtures(fixtures)
        rows = []
        for i, case in enumerate(cases, 1):
            row = run_case(case, fixtures)
            rows.append(row)
            sys.stdout.write(f"[{i}/{len(cases)}] {'ok ' if not row['problems'] else 'BAD'} {case.tool}: {case.what}: "
                             f"exit {row['code']} ({row['seconds']} s) {'; '.join(row['problems'])}\n")
            sys.stdout.flush()
    finally:
        shutil.rmtree(fixtures, ignore_errors=True)
    text = table(rows, str(Path(tempfile.gettempdir())))
    if args.table:
        args.table.write_text(text)
    bad = [r for r in rows if r["problems"]]
    sys.stdout.write(f"{len(rows)} cases, {len(rows) - len(bad)} kept every promise, {len(bad)} did not\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
