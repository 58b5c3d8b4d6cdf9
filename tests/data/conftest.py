"""Fixtures for the data tests: a tiny tokenizer and a small JSONL corpus."""

from __future__ import annotations

import random

import pytest

from tests.data.helpers import random_text, write_jsonl


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> str:
    """A 300-entry SentencePiece BPE model trained on generated text (well under a second)."""
    from megatrain.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    texts = [random_text(rng, 40) + f" {i} ünïcode" for i in range(400)]
    out = tmp_path_factory.mktemp("tok") / "tiny"
    return train_tokenizer(texts, 300, str(out), num_threads=1)


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory) -> str:
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    return write_jsonl(str(path), [random_text(rng, rng.randint(1, 80)) for _ in range(300)])
