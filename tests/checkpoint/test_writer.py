"""The background writer's parts: our streaming safetensors writer reads back with the safetensors library
(every dtype a checkpoint holds, empty and non-contiguous tensors), its manifest entry is the file's;
rank 0's wait for the 'done' records fails on an error record or a missing rank; one write in flight."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors import safe_open

from megatrain.checkpoint import writer
from megatrain.files import file_entry


def test_streamed_safetensors_read_back_bitwise(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(3, 5, generator=g), "b16": torch.randn(7, generator=g).bfloat16(),
               "h16": torch.randn(2, 2, generator=g).half(), "t": torch.randn(4, 6, generator=g).t(),
               "empty": torch.zeros(0, 3), "step": torch.tensor(5, dtype=torch.int64)}
    path = tmp_path / "x.safetensors"
    entry = writer.write_safetensors(path, tensors, {"tp": "2", "format": "pt"})
    assert entry == file_entry(path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"tp": "2", "format": "pt"}
        assert sorted(f.keys()) == sorted(tensors)
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k


def test_device_tensors_are_refused(tmp_path):
    with pytest.raises(ValueError, match="host memory"):
        writer.write_safetensors(tmp_path / "x", {"m": torch.zeros(2, device="meta")}, {})


def test_collect_done_merges_records_and_names_failures(tmp_path):
    writer.write_done(tmp_path, 0, {"a": {"size": 1, "sha256": "x"}})
    writer.write_done(tmp_path, 1, {"b": {"size": 2, "sha256": "y"}})
    assert writer.collect_done(tmp_path, 2, timeout_s=1) == {"a": {"size": 1, "sha256": "x"},
                                                               "b": {"size": 2, "sha256": "y"}}
    writer.write_done(tmp_path, 1, error="OSError: [Errno 28] No space left on device")
    with pytest.raises(writer.SaveError, match="rank 1 could not write its files: OSError"):
        writer.collect_done(tmp_path, 2, timeout_s=1)
    writer.write_done(tmp_path, 1, {})
    with pytest.raises(writer.SaveError, match=r"no 'done' record from rank\(s\) \[2\]"):
        writer.collect_done(tmp_path, 3, timeout_s=0.1)


def test_background_writer_one_job_at_a_time():
    w, gate = writer.BackgroundWriter(), threading.Event()
    w.submit(lambda: gate.wait(10) and "first", "t1")
    assert w.busy
    with pytest.raises(RuntimeError, match="in flight"):
        w.submit(lambda: None, "t2")
    gate.set()
    assert w.wait() == [("first", None)] and not w.busy

    def fail():
        raise OSError("disk on fire")

    w.submit(fail, "t3")
    (res, err), = w.wait()
    assert res is None and isinstance(err, OSError)
