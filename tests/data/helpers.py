"""Helpers for the data tests: tiny datasets written with the builder, generated text."""

from __future__ import annotations

import json
import random

import numpy as np

from megatrain.data.indexed import IndexedDatasetBuilder

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega river stone cloud forest signal vector tensor python token batch").split()


def make_dataset(prefix: str, documents: list[list[list[int]]] | list[list[int]], vocab_size: int = 1000,
                 **sidecar) -> str:
    """Write a dataset; ``documents`` is a list of documents, each a list of sequences (or one flat sequence)."""
    with IndexedDatasetBuilder(prefix, vocab_size=vocab_size) as b:
        for doc in documents:
            seqs = doc if doc and isinstance(doc[0], (list, np.ndarray)) else [doc]
            for s in seqs:
                b.add_sequence(np.asarray(s, dtype=np.int64))
            b.end_document()
        b.finalize(**sidecar)
    return prefix


def random_documents(n: int, rng: np.random.Generator, vocab: int = 1000, max_len: int = 60,
                     min_len: int = 0) -> list[list[int]]:
    return [rng.integers(0, vocab, rng.integers(min_len, max_len + 1)).tolist() for _ in range(n)]


def position_dataset(prefix: str, lengths: list[int]) -> str:
    """Every token's value is its global position (int32), so a sample tells exactly which tokens it holds."""
    docs, pos = [], 0
    for n in lengths:
        docs.append(list(range(pos, pos + n)))
        pos += n
    return make_dataset(prefix, docs, vocab_size=max(pos, 1) + 70000)


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_jsonl(path: str, texts: list[str], key: str = "text") -> str:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t}) + "\n")
    return path


def logging_calls(fn, log_path):
    """``fn`` wrapped to append a line to ``log_path`` per call: counts calls across forked processes."""

    def wrapper(*args, **kwargs):
        with open(log_path, "a") as f:
            f.write("built\n")
        return fn(*args, **kwargs)

    return wrapper
