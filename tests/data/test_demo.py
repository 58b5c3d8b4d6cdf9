"""The built-in demo corpus builds (once, even with several processes asking at once) and trains."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import numpy as np
import pytest

from megatrain.config import PRESETS, DataConfig
from megatrain.data import demo
from megatrain.data.indexed import IndexedDataset, read_sidecar
from megatrain.data.loader import build_datasets, data_fingerprint
from megatrain.data.tokenizer import Tokenizer
from tests.data.helpers import logging_calls


def _prepare(cache_dir):
    return demo.prepare_demo(cache_dir)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("democache")
    cache_dir = str(root / "demo")
    log = root / "builds.log"
    real = demo._build_demo
    demo._build_demo = logging_calls(real, log)
    try:
        with mp.get_context("fork").Pool(2) as pool:  # two "ranks" asking at once
            results = pool.map(_prepare, [cache_dir, cache_dir])
    finally:
        demo._build_demo = real
    assert results[0] == results[1]
    assert open(log).read().count("built") == 1
    return root


def test_demo_corpus_builds(demo_dir):
    prefix, model = demo.prepare_demo(str(demo_dir / "demo"))
    tok = Tokenizer(model)
    assert tok.vocab_size == PRESETS["demo"]["vocab_size"] == 4096
    ds = IndexedDataset(prefix, verify="full")
    assert ds.num_documents > 300 and ds.num_tokens > 200_000 and ds.dtype == np.uint16
    side = read_sidecar(prefix)
    assert side["tokenizer_sha256"] == tok.sha256 and side["vocab_size"] == 4096
    assert ds.get_document(0)[-1] == tok.eod_id
    with open(os.path.join(demo_dir, "demo", "corpus.jsonl")) as f:
        first = json.loads(f.readline())
    assert first["source"].startswith("pydoc_data.topics:")
    assert tok.decode(ds.get_document(0)[:-1].tolist()) == first["text"]


def test_second_call_is_cached(demo_dir):
    marker = os.path.join(demo_dir, "demo", "demo.done.json")
    before = os.stat(marker).st_mtime_ns
    demo.prepare_demo(str(demo_dir / "demo"))
    assert os.stat(marker).st_mtime_ns == before


def test_no_path_means_the_demo(demo_dir):
    cfg = DataConfig(path=None, cache_dir=str(demo_dir))
    tok = Tokenizer(os.path.join(demo_dir, "demo", "tokenizer.model"))
    out = build_datasets(cfg, seq_len=256, num_samples={"train": 100, "valid": 10}, seed=0, vocab_size=4096,
                         tokenizer_sha256=tok.sha256)
    assert out["train"][0].shape == (257,) and len(out["valid"]) >= 10
    assert data_fingerprint(cfg) == data_fingerprint(DataConfig(path=os.path.join(demo_dir, "demo", "demo")))
