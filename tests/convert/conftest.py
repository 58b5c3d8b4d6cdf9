"""Shared fixtures for conversion tests: a tiny sentencepiece tokenizer and debug-preset checkpoints."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from megatrain import ckpt_layout as layout
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


def model_from(cfg: Config, sd: dict[str, torch.Tensor]):
    m = build_model(cfg.model).eval()
    m.load_state_dict(sd)
    return m


def convert(*argv: object) -> int:
    from megatrain.convert.cli import main

    return main([str(a) for a in argv])
