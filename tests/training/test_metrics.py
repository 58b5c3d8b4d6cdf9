"""metrics.jsonl, wandb in offline mode, the console line and the plot tool."""

import json
import subprocess
import sys

from megatrain.telemetry.metrics import MetricsSink, format_step_line


def test_step_line_has_every_field():
    rec = {"step": 512, "loss": 7.0701, "ppl": 1176.2, "lr": 1.5e-4, "grad_norm": 0.255, "tokens": 16.8e6,
           "tokens_per_s": 142851, "tflops": 312.0, "mfu": 0.315, "mem_gib": 23.1}
    line = format_step_line(rec, 10000, 58, 3720)
    assert line == ("step 512/10000 (5.1%) | loss 7.0701 | ppl 1176.2 | lr 1.50e-04 | grad_norm 0.255 | "
                    "tokens 16.8M | 142,851 tok/s | 312.0 TFLOP/s | MFU 31.5% | mem 23.1 GiB | 58s elapsed | eta 1h02m")


def test_step_line_shows_small_flop_rates():
    # a CPU run of a small model: 0.04 TFLOP/s used to print as "0.0 TFLOP/s"
    rec = {"step": 10, "loss": 7.0, "ppl": 1096.6, "lr": 1e-3, "grad_norm": None, "tokens": 20480,
           "tokens_per_s": 3000, "tflops": 0.0412, "mfu": None, "mem_gib": 0.8}
    line = format_step_line(rec, 20, 6, 6)
    assert "| 41.2 GFLOP/s |" in line and "MFU" not in line
    assert "| 3.0 MFLOP/s |" in format_step_line({**rec, "tflops": 3e-6}, 20, 6, 6)


def test_wandb_offline_without_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    sink = MetricsSink(tmp_path, True, "megatrain-test", "t", {"a": 1})
    assert sink.wandb is not None and sink.wandb.settings.mode == "offline"
    sink.write({"step": 1, "loss": 2.0})
    sink.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.0
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_plot_metrics_tool(tmp_path):
    lines = [{"step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "tokens_per_s": 100.0} for s in range(1, 11)]
    lines.append({"step": 10, "eval_loss": 4.2, "eval_ppl": 66.7})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = subprocess.run([sys.executable, "tools/plot_metrics.py", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "metrics.png").stat().st_size > 10_000
    assert "10 logged steps" in out.stdout


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_torn_last_line_is_cut_before_the_next_record(tmp_path):
    """kill -9 inside a write leaves a line without its newline; resuming must not glue onto it."""
    sink = MetricsSink(tmp_path, True, None, "t", {})
    sink.write({"step": 1, "loss": 2.0})
    sink.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"time": 1.0, "step": 2, "lo')  # torn
    sink = MetricsSink(tmp_path, True, None, "t", {})
    sink.write({"step": 2, "loss": 1.5})
    sink.close()
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl")] == [1, 2]
    # a whole record that only lost its newline is kept
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"time": 1.0, "step": 3, "loss": 1.0}')
    sink = MetricsSink(tmp_path, True, None, "t", {})
    sink.write({"step": 4, "loss": 0.5})
    sink.close()
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_plot_metrics_reads_torn_and_odd_files(tmp_path):
    good = [{"time": 1.0, "step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "tokens_per_s": 100.0} for s in range(1, 6)]
    text = "\n".join(json.dumps(r) for r in good[:2])
    text += '\n{"time": 1.0, "step": 3, "lo' + json.dumps(good[2])  # glued by an older writer
    text += "\n" + "\n".join(json.dumps(r) for r in good[3:]) + '\n7\n{"step": 9}\n\xff\xfe\n'
    (tmp_path / "metrics.jsonl").write_bytes(text.encode("utf-8", "surrogateescape"))
    out = subprocess.run([sys.executable, "tools/plot_metrics.py", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "5 logged steps" in out.stdout and "torn record" in out.stderr
    # the plot never replaces the metrics, or a file that is not an earlier plot
    for bad, words in ((tmp_path / "metrics.jsonl", "PNG image"), (tmp_path / "notes.png", "not a PNG")):
        if bad.suffix == ".png":
            bad.write_text("mine")
        before = bad.read_bytes()
        out = subprocess.run([sys.executable, "tools/plot_metrics.py", str(tmp_path), "--out", str(bad)],
                             capture_output=True, text=True)
        assert out.returncode == 2 and words in out.stderr and bad.read_bytes() == before
