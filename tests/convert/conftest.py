"""Shared fixtures for conversion tests: a tiny sentencepiece tokenizer and debug-preset checkpoints."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from megatrain.checkpoint import layout
from megatrain.config import Config, load_config
from megatrain.model import build_model

VOCAB = 512  # the debug preset's vocabulary


def train_tiny_tokenizer(prefix: Path, vocab_size: int, seed: int = 0) -> Path:
    """A BPE sentencepiece model (LLaMA ids: unk 0, bos 1, eos 2, byte fallback) from generated text."""
    from megatrain.data.tokenizer import train_tokenizer

    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ten", "ra", "su", "vo", "ne", "pi", "dar", "el", "on", "is", "qu", "th", "ex",
                 "ba", "zo", "ri", "gen", "the", "in", "an", "ing"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))).capitalize() + "."
             for _ in range(3000)]
    return Path(train_tokenizer(texts, vocab_size, str(prefix), num_threads=1))


@pytest.fixture(autouse=True)
def _one_thread():
    # Debug-sized matmuls: with several threads on a shared 2-core machine, thread hand-offs cost far
    # more than the arithmetic (5x slower conversions measured).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok", VOCAB)


def debug_config(*overrides: str) -> Config:
    # A larger init std than training uses: logits with a real spread make greedy decoding a sharp test.
    return load_config(None, ["model.preset=debug", "model.init_std=0.1", "train.precision=fp32", *overrides])


def make_checkpoint(path: Path, cfg: Config, *, seed: int = 1, tp: int = 1, pp: int = 1,
                    tokenizer: Path | None = None) -> dict[str, torch.Tensor]:
    """A complete weights-only checkpoint of a freshly initialised debug model; returns its canonical weights."""
    sd = {k: v.clone() for k, v in build_model(cfg.model, seed=seed).state_dict().items()}
    extra = {"tokenizer.model": tokenizer} if tokenizer else None
    layout.write_weights_only_checkpoint(path, cfg.to_dict(), sd, tp=tp, pp=pp, extra_files=extra)
    return sd


def make_hf_llama(path: Path, tokenizer: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                  **config: object) -> Path:
    """A genuine transformers checkpoint (save_pretrained) with the debug preset's shapes unless
    ``config`` overrides them; every tensor perturbed so that a mix-up of two tensors shows."""
    import shutil

    import transformers

    hc = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": False, **config}
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hc)).to(dtype)
    with torch.no_grad():  # HF initialises norms to exactly 1
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(path))
    shutil.copyfile(tokenizer, path / "tokenizer.model")
    return path


def model_from(cfg: Config, sd: dict[str, torch.Tensor]):
    m = build_model(cfg.model).eval()
    m.load_state_dict(sd)
    return m


def convert(*argv: object) -> int:
    from megatrain.convert.cli import main

    return main([str(a) for a in argv])


PROMPTS = 5
NEW_TOKENS = 32


def assert_hf_export_matches(hf_dir: Path, cfg: Config, weights: dict[str, torch.Tensor], tok_path: Path) -> float:
    """The HF export loads in transformers, its logits match megatrain's within 1e-4 (fp32) and greedy
    decoding of 32 tokens from 5 prompts agrees token for token; a randomly initialised megatrain
    model (negative control) fails the same check. Returns the max logit difference."""
    from transformers import AutoModelForCausalLM

    from megatrain.convert import verify
    from megatrain.data.tokenizer import Tokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ours = verify.megatrain_runner(cfg.model, weights)
    theirs = verify.hf_runner(hf_dir)
    tokens = verify.probe_tokens(cfg.model.vocab_size, 64)
    with torch.no_grad():
        diff = (ours(tokens) - hf(input_ids=tokens).logits).abs().max().item()
    assert diff <= 1e-4, diff
    prompts = verify.build_prompts(Tokenizer(str(tok_path)), cfg.model.vocab_size, PROMPTS)
    a, _ = verify.greedy(ours, prompts, NEW_TOKENS)
    b, _ = verify.greedy(theirs, prompts, NEW_TOKENS)
    assert a.shape == (PROMPTS, NEW_TOKENS) and torch.equal(a, b)
    result = verify.compare(ours, theirs, prompts, tokens, NEW_TOKENS, atol=1e-4, rtol=0.0)
    assert result.ok and result.greedy_agree == PROMPTS
    # negative control: the same check against a randomly initialised model must fail
    rnd = verify.megatrain_runner(cfg.model, build_model(cfg.model, seed=12345).state_dict())
    control = verify.compare(rnd, theirs, prompts, tokens, NEW_TOKENS, atol=1e-4, rtol=0.0)
    assert not control.ok and control.max_abs_diff > 1e-2 and control.greedy_agree < PROMPTS
    return diff
