"""build_datasets and the per-rank micro-batch stream (DP size and accumulation do not change it)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from megatrain.config import ConfigError, DataConfig
from megatrain.data.loader import (MicroBatchSampler, build_datasets, build_micro_batches, data_fingerprint,
                                   micro_batch_indices)
from tests.data.helpers import make_dataset, position_dataset

MB, G, SEQ = 2, 8, 5


class Identity:
    """dataset[i] = [i, i, ..., i]: a micro-batch shows exactly which global samples it holds."""

    def __init__(self, n=10_000):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.full(SEQ + 1, i, dtype=np.int64)


def _global_stream(dataset, dp: int, steps: int, consumed: int = 0) -> list[list[int]]:
    """Per optimizer step, the samples all ranks consumed, in (micro-step, rank) order."""
    ga = G // (MB * dp)
    iters = [build_micro_batches(dataset, micro_batch_size=MB, global_batch_size=G, dp_rank=r, dp_size=dp,
                                 consumed_samples=consumed) for r in range(dp)]
    out = []
    for _ in range(steps):
        step = []
        for _ in range(ga):
            for it in iters:
                tokens, labels = next(it)
                assert tokens.shape == labels.shape == (MB, SEQ) and tokens.dtype == torch.int64
                assert torch.equal(tokens[:, 1:], labels[:, :-1])
                step.append(tokens)
        out.append(torch.cat(step).tolist())
    for it in iters:
        it.close()
    return out


@pytest.fixture(scope="module")
def real_train(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    prefix = position_dataset(str(tmp / "pos"), [int(x) for x in np.random.default_rng(0).integers(0, 30, 200)])
    cfg = DataConfig(path=prefix, split="1,0,0", cache_dir=str(tmp / "cache"))
    return build_datasets(cfg, seq_len=SEQ, num_samples={"train": 64}, seed=0, vocab_size=200_000,
                          tokenizer_sha256=None)["train"]


@pytest.mark.parametrize("which", ["identity", "real"])
def test_stream_independent_of_dp_and_accumulation(which, real_train):
    dataset = Identity() if which == "identity" else real_train
    streams = [_global_stream(dataset, dp, steps=3) for dp in (1, 2, 4)]  # (DP, GA) = (1, 4), (2, 2), (4, 1)
    assert streams[0] == streams[1] == streams[2]
    if which == "identity":
        flat = [row[0] for step in streams[0] for row in step]
        assert flat == list(range(3 * G))  # step s consumes samples [s*G, (s+1)*G) in order


def test_rank_layout():
    ids = micro_batch_indices(micro_batch_size=2, global_batch_size=16, dp_rank=1, dp_size=4, consumed_samples=32)
    assert [list(next(ids)) for _ in range(3)] == [[34, 35], [42, 43], [50, 51]]


def test_resume_with_another_dp_size_continues_the_stream(real_train):
    uninterrupted = _global_stream(real_train, dp=1, steps=4)
    first = _global_stream(real_train, dp=2, steps=2)
    resumed = _global_stream(real_train, dp=4, steps=2, consumed=2 * G)
    assert first + resumed == uninterrupted


def test_dataloader_workers_give_the_same_stream(real_train):
    ref = build_micro_batches(real_train, micro_batch_size=MB, global_batch_size=G, dp_rank=1, dp_size=2,
                              consumed_samples=0)
    via_workers = build_micro_batches(real_train, micro_batch_size=MB, global_batch_size=G, dp_rank=1, dp_size=2,
                                      consumed_samples=0, num_workers=1)
    for _ in range(5):
        a, b = next(ref), next(via_workers)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ref.close()
    via_workers.close()


def test_bad_batch_arguments():
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        MicroBatchSampler(Identity(), micro_batch_size=3, global_batch_size=8, dp_rank=0, dp_size=2)


def test_errors_in_the_prefetch_thread_reach_the_caller():
    class Broken(Identity):
        def __getitem__(self, i):
            if i == 5:
                raise ValueError("bad sample 5")
            return super().__getitem__(i)

    it = build_micro_batches(Broken(), micro_batch_size=2, global_batch_size=2, dp_rank=0, dp_size=1,
                             consumed_samples=0)
    next(it), next(it)
    with pytest.raises(ValueError, match="bad sample 5"):
        next(it)
    it.close()


def test_past_the_end_starts_over(caplog):
    it = build_micro_batches(Identity(n=6), micro_batch_size=2, global_batch_size=4, dp_rank=0, dp_size=1,
                             consumed_samples=4)
    assert next(it)[0][:, 0].tolist() == [4, 5]
    assert next(it)[0][:, 0].tolist() == [0, 1]
    it.close()
    assert "starting over" in caplog.text


class Recording(Identity):
    """Identity that remembers every index read (by the prefetch thread too)."""

    def __init__(self, n):
        super().__init__(n)
        self.read = set()

    def __getitem__(self, i):
        self.read.add(i)
        return super().__getitem__(i)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_bounded_stream_never_reads_past_what_it_serves(caplog, num_workers):
    # An evaluation of 3 micro-batches on a split built for exactly 3 x 2 samples: the prefetch used to
    # read ahead into samples 6, 7, ... and warn "sample 6 is past the 6 samples built for this split".
    ds = Recording(n=6)
    it = build_micro_batches(ds, micro_batch_size=2, global_batch_size=2, dp_rank=0, dp_size=1,
                             consumed_samples=0, num_micro_batches=3, num_workers=num_workers)
    got = [next(it)[0][:, 0].tolist() for _ in range(3)]
    assert got == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(StopIteration):
        next(it)
    it.close()
    if num_workers == 0:  # (worker processes read their own copy of the dataset)
        assert max(ds.read) == 5
    assert "past the" not in caplog.text


def test_build_datasets_splits(tmp_path):
    rng = np.random.default_rng(0)
    prefix = make_dataset(str(tmp_path / "d"), [rng.integers(0, 1000, 40).tolist() for _ in range(100)])
    cfg = DataConfig(path=prefix, split="80,20,0", cache_dir=str(tmp_path / "c"))
    out = build_datasets(cfg, seq_len=16, num_samples={"train": 500, "valid": 3}, seed=0, vocab_size=1000,
                         tokenizer_sha256=None)
    assert set(out) == {"train", "valid"}  # test has weight 0: absent
    assert len(out["train"]) >= 500 and len(out["valid"]) >= 3
    sample = out["train"][0]
    assert sample.dtype == np.int64 and sample.shape == (17,)
    assert os.path.isdir(tmp_path / "c")
    # train and valid draw from disjoint documents
    train_seqs = set(out["train"].sequence_ids.tolist())
    assert train_seqs.isdisjoint(out["valid"].sequence_ids.tolist()) and len(train_seqs) == 80


def test_default_cache_dir_is_next_to_the_dataset(tmp_path):
    prefix = make_dataset(str(tmp_path / "d"), [list(range(50)) for _ in range(4)])
    build_datasets(DataConfig(path=prefix, split="1"), seq_len=8, num_samples={"train": 5}, seed=0, vocab_size=1000,
                   tokenizer_sha256=None)
    assert any(f.endswith(".npy") for f in os.listdir(tmp_path / "index-cache"))


def test_data_fingerprint(tmp_path):
    a = make_dataset(str(tmp_path / "a"), [[1, 2, 3], [4, 5]])
    b = make_dataset(str(tmp_path / "b"), [[1, 2, 3], [4, 6]])
    fp = data_fingerprint(DataConfig(path=a))
    assert fp == data_fingerprint(DataConfig(path=a)) and len(fp) == 16
    assert fp != data_fingerprint(DataConfig(path=b))
    assert fp != data_fingerprint(DataConfig(path=a, split="90,10,0"))
    assert data_fingerprint(DataConfig(path=f"1 {a} 1 {b}")) != data_fingerprint(DataConfig(path=f"1 {a} 2 {b}"))
    assert data_fingerprint(DataConfig(path=f"1 {a} 1 {b}")) == data_fingerprint(DataConfig(path=f"2 {a} 2 {b}"))
    os.makedirs(tmp_path / "moved")
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(a + ext, str(tmp_path / "moved" / "a") + ext)
    assert data_fingerprint(DataConfig(path=str(tmp_path / "moved" / "a"))) == fp
    os.remove(a + ".json")  # no sidecar: the index content is hashed instead
    assert len(data_fingerprint(DataConfig(path=a))) == 16


def test_dropped_sampler_stops_its_thread():
    import gc
    import threading
    import time

    before = threading.active_count()
    it = build_micro_batches(Identity(), micro_batch_size=2, global_batch_size=2, dp_rank=0, dp_size=1,
                             consumed_samples=0)
    next(it)
    assert threading.active_count() == before + 1
    del it  # an evaluation that read what it needed and moved on, without close()
    gc.collect()
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_interpreter_exit_waits_for_the_prefetch_thread(tmp_path):
    """A sampler never closed: at exit the prefetch thread finishes the batch it is assembling and stops,
    instead of being killed inside dataset code (inside a torch op that can abort the interpreter)."""
    import subprocess
    import sys
    import textwrap

    log = tmp_path / "log"
    script = textwrap.dedent(f"""
        import time
        import numpy as np
        from megatrain.data.loader import build_micro_batches

        class Slow:
            def __len__(self):
                return 1000

            def __getitem__(self, i):
                with open({str(log)!r}, "a") as f:
                    f.write("start\\n")
                time.sleep(0.3)
                with open({str(log)!r}, "a") as f:
                    f.write("done\\n")
                return np.zeros(6, dtype=np.int64)

        it = build_micro_batches(Slow(), micro_batch_size=1, global_batch_size=1, dp_rank=0, dp_size=1,
                                 consumed_samples=0)
        next(it)
        deadline = time.time() + 30  # until the thread is inside __getitem__ of a later sample; then the script ends
        while open({str(log)!r}).read().count("start") < 2 and time.time() < deadline:
            time.sleep(0.01)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0, out.stderr
    lines = log.read_text().split()
    assert lines.count("start") >= 2 and lines.count("start") == lines.count("done"), lines
