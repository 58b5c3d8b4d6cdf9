"""FP8 (torchao emulation on CPU) in whole training runs of the debug model: it tracks bf16 and differs
from it, TP=2 tracks TP=1 and ZeRO-3 tracks ZeRO-1 under FP8, a checkpoint saved with FP8 resumes with
it off, and bad FP8 settings are refused before any data is read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao")

from megatrain.launch.testing import run_distributed  # noqa: E402
from tests.tiny import tiny_run  # noqa: E402

BF16_TOL = 0.01  # FP8 vs bf16 loss, per step, relative: bf16 vs fp32 is held to 0.02 (test_main.py)
TP_TOL = 0.005  # FP8 TP=2 vs TP=1 loss, relative: per-shard scales, fp32 between the GEMMs
ZERO_TOL = 1e-4  # FP8 ZeRO-3 vs ZeRO-1, PP=2 vs PP=1: the same FP8 GEMMs on the same tensors


def _args(data: str, run_dir: str, steps: int) -> list[str]:
    return tiny_run(data, run_dir, steps, "train.resume=never", "checkpoint.save_at_end=false", "train.fp8_filter=all")


def _train(data: str, run_dir: str, steps: int, extra: list[str]):
    import torch.distributed as dist

    from megatrain.config import load_config
    from megatrain.parallel.state import ParallelState
    from megatrain.train import train_with

    cfg = load_config(None, _args(data, run_dir, steps) + extra)
    tr = train_with(cfg, ParallelState.build(cfg.parallel.tensor, cfg.parallel.pipeline), torch.device("cpu"))
    dist.barrier()
    fp8 = sum(getattr(m, "fp8_gemm", None) is not None for m in tr.engine.module.modules())
    return {r["step"]: r["loss"] for r in tr.history if "loss" in r}, fp8


def _many(data: str, root: str, steps: int, runs: dict) -> dict:
    return {name: _train(data, f"{root}/{name}", steps, extra) for name, extra in runs.items()}


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in b)


def test_fp8_tracks_bf16_for_20_steps_and_differs(pattern_dataset, tmp_path):
    runs = {"bf16": ["train.precision=bf16", "train.micro_batch_size=4"]}
    runs.update({r: ["train.precision=bf16", "train.micro_batch_size=4", f"train.fp8={r}"]
                 for r in ("tensorwise", "rowwise", "rowwise_with_gw_hp")})
    got = run_distributed(_many, 1, pattern_dataset, str(tmp_path), 20, runs)[0]
    ref, n_ref = got.pop("bf16")
    assert n_ref == 0 and len(ref) == 20 and ref[20] < ref[1] - 0.3, ref
    for recipe, (losses, n_fp8) in got.items():
        assert n_fp8 == 8, (recipe, n_fp8)  # all eight block linears of the debug model
        assert _worst(losses, ref) <= BF16_TOL, (recipe, _worst(losses, ref))
        assert losses != ref, recipe  # FP8 really ran


def test_fp8_tp2_tracks_tp1_and_pp2_zero3_match(pattern_dataset, tmp_path):
    common = ["train.precision=fp32", "train.fp8=tensorwise"]
    one = run_distributed(_many, 1, pattern_dataset, str(tmp_path / "one"), 8,
                          {"tp1": common + ["train.micro_batch_size=4"]})[0]
    two = run_distributed(_many, 2, pattern_dataset, str(tmp_path / "two"), 8, {
        "tp2": common + ["train.micro_batch_size=4", "parallel.tensor=2"],
        "pp2": common + ["train.micro_batch_size=2", "parallel.pipeline=2"],
        "zero1": common + ["train.micro_batch_size=2", "deepspeed.zero_stage=1"],
        # recomputation re-runs the FP8 forward while ZeRO-3 re-gathers the weights for the backward
        "zero3": common + ["train.micro_batch_size=2", "deepspeed.zero_stage=3",
                           "train.activation_checkpointing=selective"]})[0]
    assert all(n == 8 for _, n in (one["tp1"], two["tp2"], two["zero1"], two["zero3"]))
    assert two["pp2"][1] == 4  # each stage holds one of the two blocks
    assert _worst(two["tp2"][0], one["tp1"][0]) <= TP_TOL, _worst(two["tp2"][0], one["tp1"][0])
    # per-tensor scales see a micro-batch: PP=2 (2 x 2 samples) is compared with DP=2 (2 samples a rank)
    assert _worst(two["pp2"][0], two["zero1"][0]) <= ZERO_TOL, _worst(two["pp2"][0], two["zero1"][0])
    assert _worst(two["zero3"][0], two["zero1"][0]) <= ZERO_TOL, _worst(two["zero3"][0], two["zero1"][0])


def _resume(data: str, root: str) -> dict:
    base = ["train.precision=fp32", "train.micro_batch_size=4", "checkpoint.interval=3", "checkpoint.keep_last=0"]
    saved, _ = _train(data, f"{root}/fp8", 6, base + ["train.fp8=tensorwise"])
    ckpt = f"{root}/fp8/checkpoints/step_{3:08d}"
    off, n_off = _train(data, f"{root}/off", 6, base + [f"train.resume={ckpt}"])
    on, _ = _train(data, f"{root}/on", 6, base + [f"train.resume={ckpt}", "train.fp8=tensorwise"])
    return {"saved": saved, "off": off, "on": on, "n_off": n_off, "ckpt": ckpt}


def test_checkpoint_saved_with_fp8_resumes_with_fp8_off(pattern_dataset, tmp_path):
    from safetensors import safe_open

    got = run_distributed(_resume, 1, pattern_dataset, str(tmp_path))[0]
    saved, off, on = got["saved"], got["off"], got["on"]
    assert sorted(off) == sorted(on) == [4, 5, 6] and got["n_off"] == 0
    assert on == {s: saved[s] for s in (4, 5, 6)}  # the FP8 run itself resumes exactly
    assert 0 < _worst(off, on) <= BF16_TOL  # without FP8 it continues the same curve, in high precision
    files = list(Path(got["ckpt"]).rglob("*.safetensors"))
    assert files
    for f in files:  # FP8-free: the same tensors and dtypes as any checkpoint
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                assert sf.get_slice(k).get_dtype() in ("F32", "BF16", "I64", "F64", "U8", "I32"), (f, k)


def test_fp8_with_fp16_is_refused_at_load():
    from megatrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.precision=bf16"):
        load_config(None, ["train.fp8=rowwise", "train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.fp8='fp8'"):
        load_config(None, ["train.fp8=fp8"])
    with pytest.raises(ConfigError, match="fp8_exclude"):
        load_config(None, ["train.fp8=rowwise", "train.fp8_exclude=[blocks.(]"])


def test_gpu_checks(monkeypatch):
    """Below compute capability 8.9, or with fp32 on a GPU: a ConfigError naming the fix."""
    from megatrain.config import ConfigError, load_config
    from megatrain.parallel import fp8

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    t = load_config(None, ["train.fp8=tensorwise", "train.precision=bf16"]).train
    with pytest.raises(ConfigError, match="compute capability 8.0"):
        fp8.check_fp8(t, cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert fp8.check_fp8(t, cuda) is False  # Hopper, bf16: the real _scaled_mm path
    t.precision = "fp32"
    with pytest.raises(ConfigError, match="needs train.precision=bf16"):
        fp8.check_fp8(t, cuda)
    assert fp8.check_fp8(t, torch.device("cpu")) is True  # CPU: emulated, fp32 allowed


def test_torchao_outside_the_supported_range(monkeypatch):
    import torchao

    from megatrain.config import ConfigError
    from megatrain.parallel import fp8

    monkeypatch.setattr(torchao, "__version__", "0.13.0")
    with pytest.raises(ConfigError, match=r"torchao>=0.18,<0.19.*found 0.13.0"):
        fp8.require_torchao()
    monkeypatch.setitem(__import__("sys").modules, "torchao", None)  # not installed
    with pytest.raises(ConfigError, match="needs torchao"):
        fp8.require_torchao()


def test_main_refuses_fp8_before_data(capsys, tmp_path, monkeypatch):
    import os

    import torchao

    from megatrain.train import main
    from tests.training.test_main import BASE, LAUNCH_VARS

    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(torchao, "__version__", "0.20.1")
    rc = main(BASE + ["train.fp8=tensorwise", "data.path=/nonexistent/ds", f"run.dir={tmp_path}/run"])
    for k in LAUNCH_VARS:  # main() exports what it discovered; leave the environment as it was
        os.environ.pop(k, None)
    out = capsys.readouterr().out
    assert rc == 2 and "found 0.20.1" in out and "/nonexistent" not in out, out  # before the dataset is opened


def test_start_report_shows_which_linears_run_in_fp8():
    from megatrain.config import load_config
    from megatrain.data.batch import plan_batch
    from megatrain.telemetry.report import start_report

    def line(*over: str) -> str:
        cfg = load_config(None, ["model.preset=tinyllama-1.1b", *over])
        return next(x for x in start_report(cfg, 2, 1, plan_batch(cfg.train, 1)).splitlines() if "fp8:" in x)

    assert line().strip() == "fp8: off"
    # TinyLlama at TP=2 (local n x k): qkv 1280x2048, o 2048x1024, gate_up 5632x2048, down 2048x2816.
    # torchao's rowwise rule keeps only gate_up; its tensorwise rule takes all four
    rw = line("train.fp8=rowwise", "parallel.tensor=2")
    assert "22 of 88" in rw and "mlp.gate_up 5632x2048 fp8" in rw and "attn.o 2048x1024 bf16 (too small" in rw, rw
    tw = line("train.fp8=tensorwise", "parallel.tensor=2", r"train.fp8_exclude=[blocks\.0\.]")
    assert "84 of 88" in tw and "attn.qkv 1280x2048 fp8 in 21/22" in tw, tw
    assert "excluded by train.fp8_exclude: blocks.0.attn.qkv, blocks.0.attn.o" in tw, tw
