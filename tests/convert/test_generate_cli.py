"""megatrain-generate: from a run directory, a step directory and an HF export of the same weights,
on one rank and tensor-parallel over two (torchrun, gloo), the greedy text is the reference's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.convert.conftest import convert, debug_config, make_checkpoint, model_from, train_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["Kalo miten", "The"]
TOKENS = 12


def reference(cfg, sd, tok, prompt: str, limit: int) -> str:
    """Greedy decoding written out: arg-max over the tokenizer's ids, stop at eos."""
    model = model_from(cfg, sd)
    ids = tok.encode(prompt)
    new = []
    with torch.no_grad():
        for _ in range(TOKENS):
            nxt = int(model(torch.tensor([ids + new]))[0, -1, :limit].argmax())
            new.append(nxt)
            if nxt == tok.eos_id:
                break
    return prompt + tok.decode([t for t in new if t != tok.eos_id])


def generate_here(capsys, *args) -> subprocess.CompletedProcess:
    """The tool's main() in this process (one rank): what the console script runs, without a start-up."""
    sys.path.insert(0, str(REPO))
    from tools.generate import main

    capsys.readouterr()
    code = main([str(a) for a in args] + ["--greedy", "--max-tokens", str(TOKENS)])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def run_generate(*args, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, str(REPO / "tools/generate.py")]
    if nproc > 1:
        from megatrain.launch.discover import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", str(REPO / "tools/generate.py")]
    args = [str(a) for a in args] + ["--greedy", "--max-tokens", str(TOKENS)]
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def padded_run(tmp_path_factory):
    """A run directory whose model has 512 embedding rows but whose tokenizer has 300 pieces, with the
    padded rows' head weights made large: unmasked, greedy decoding would pick ids SentencePiece cannot
    decode."""
    from megatrain.data.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("gen")
    tok_path = train_tiny_tokenizer(root / "tok", 300)
    cfg = debug_config()
    ckpt = root / "run" / "checkpoints" / "step_00000003"
    sd = make_checkpoint(ckpt.with_name("scratch"), cfg)
    sd["head.proj.weight"][300:] *= 40.0
    from megatrain.checkpoint import layout

    layout.write_weights_only_checkpoint(ckpt, cfg.to_dict(), sd, extra_files={"tokenizer.model": tok_path})
    layout.update_latest(ckpt.parent, ckpt.name)
    return root / "run", ckpt, cfg, sd, Tokenizer(str(tok_path))


def test_generate_from_run_step_and_hf_export(padded_run, tmp_path, capsys):
    run, ckpt, cfg, sd, tok = padded_run
    want = "\n".join(reference(cfg, sd, tok, p, tok.vocab_size) for p in PROMPTS) + "\n"
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    for path in (run, ckpt):
        res = generate_here(capsys, path, *prompts)
        assert res.returncode == 0, res.stderr
        assert res.stdout == want
        assert "generated" in res.stderr and "prompt(s)" in res.stderr
    assert convert(ckpt, tmp_path / "hf", "--to", "hf", "--no-verify", "--allow-padded-vocab") == 0
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    res = generate_here(capsys, tmp_path / "hf", "--prompt-file", tmp_path / "prompts.txt")
    assert res.returncode == 0, res.stderr
    assert res.stdout == want


def test_generate_tensor_parallel_over_two_ranks(padded_run):
    run, _, _, _, _ = padded_run
    one = run_generate(run, "--prompt", PROMPTS[0])  # both as subprocesses: the same start-up path
    two = run_generate(run, "--prompt", PROMPTS[0], nproc=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr + two.stdout
    assert "TP 2" in two.stderr
    assert two.stdout == one.stdout  # rank 0 alone prints


def test_sampling_and_bad_input(padded_run, tmp_path, capsys):
    run, _, _, _, tok = padded_run
    res = generate_here(capsys, run, "--prompt", "The", "--temperature", "1.0", "--top-p", "1.0")
    assert res.returncode == 0, res.stderr  # drawing from the whole distribution never reaches a padded id
    for args, needle in [((tmp_path / "nope", "--prompt", "x"), "no such file"),
                         ((run,), "no prompt"),
                         ((run, "--prompt", "x", "--top-p", "0"), "0 < top_p <= 1"),
                         ((run, "--prompt-file", tmp_path / "missing.txt"), "--prompt-file")]:
        res = generate_here(capsys, *args)
        assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_help_names_the_inputs():
    res = subprocess.run([sys.executable, str(REPO / "tools/generate.py"), "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0 and "Hugging Face" in res.stdout and "--top-p" in res.stdout
