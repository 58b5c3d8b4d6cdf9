"""Step time with and without data.document_mask: the whole training step, and attention alone.

The model is built through megatrain.engine as a run builds it (bench/megatrain_run.py's step:
engine forward with labels, backward, step); tokens are random and every sample is cut into
``--docs`` documents at random points (the same layouts for every variant). Variants:

- ``plain``: no layout, today's causal path (cuDNN / flash SDPA on a GPU);
- ``flex`` / ``varlen`` / ``sdpa``: the mask on, with that train.document_attention kernel.

``--attention-only`` also times one layer's attention forward + backward at the model's head
shape (the issue's probe): causal SDPA against each document kernel. ``--loader`` times the loader
alone (micro-batch assembly from a synthetic dataset, with and without the layout; no model, CPU).
Prints a ``RESULT {json}`` line per measurement and a table. The goal on a GPU: the masked step no
slower than the plain one.

    # GPU, Llama-3.2-1B shape at seq 8192, 8 documents per sample
    python bench/documents.py --preset llama3.2-1b --seq 8192 --mb 1 --docs 8 --attention-only
    # CPU smoke run at toy size (what CI-sized machines can do)
    python bench/documents.py --preset debug --seq 256 --mb 2 --docs 4 --variants plain,sdpa --steps 6 --warmup 2
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import emit, gpu_name, single_process_env  # noqa: E402

log = logging.getLogger("bench.documents")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama3.2-1b", help="model.preset")
    p.add_argument("--seq", type=int, default=8192, help="train.seq_len")
    p.add_argument("--mb", type=int, default=1, help="micro-batch size")
    p.add_argument("--docs", type=int, default=8, help="documents per sample (random cut points)")
    p.add_argument("--variants", default=None, help="comma list of plain, flex, varlen, sdpa (default: all the "
                                                    "device can run)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--compile", type=int, default=0, help="torch.compile every block")
    p.add_argument("--ckpt", default="none", help="train.activation_checkpointing")
    p.add_argument("--attention-only", action="store_true", help="also time one layer's attention fwd+bwd")
    p.add_argument("--loader", action="store_true", help="time only the loader's micro-batches (mean document "
                                                         "length seq/docs), with and without the layout")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps: int, warmup: int, device: torch.device) -> list[float]:
    times = []
    for i in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        fn(i)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times[warmup:]


def layouts(mb: int, seq: int, docs: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """position_ids (mb, seq) with ``docs`` documents per sample, cut at distinct random points."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(mb):
        cuts = torch.randperm(seq - 1, generator=g)[:docs - 1] + 1 if docs > 1 else torch.zeros(0, dtype=torch.long)
        bounds = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([seq])])
        rows.append(torch.cat([torch.arange(int(n)) for n in bounds.diff()]))
    return torch.stack(rows).to(device)


def build(a: argparse.Namespace, device: torch.device):
    import deepspeed
    import torch.distributed as dist

    from megatrain.config import load_config
    from megatrain.data.batch import plan_batch
    from megatrain.engine import build_ds_config, build_engine
    from megatrain.parallel.state import ParallelState

    cuda = device.type == "cuda"
    cfg = load_config(None, [
        f"model.preset={a.preset}", f"train.seq_len={a.seq}", f"train.micro_batch_size={a.mb}",
        f"train.precision={'bf16' if cuda else 'fp32'}",
        "deepspeed.zero_stage=1", f"train.activation_checkpointing={a.ckpt}", f"train.compile={bool(a.compile)}",
        "data.document_mask=true", "schedule.warmup_steps=0", "schedule.decay=constant", "train.max_steps=1000"])
    single_process_env()
    if cuda:
        torch.cuda.set_device(0)
        deepspeed.init_distributed(dist_backend="nccl")
    elif not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    st = ParallelState.build(1, 1)
    plan = plan_batch(cfg.train, st.dp_size)
    built = build_engine(cfg, st, device, plan, build_ds_config(cfg, plan))
    return cfg, built


def step_times(a: argparse.Namespace, cfg, engine, device: torch.device, variant: str) -> list[float]:
    from megatrain.model import documents

    if variant != "plain":
        documents.configure(variant)
    vocab, gen = cfg.model.vocab_size, torch.Generator(device=device).manual_seed(0)
    pos = layouts(a.mb, a.seq, a.docs, device)

    def step(i: int) -> None:
        x = torch.randint(0, vocab, (a.mb, a.seq + 1), device=device, generator=gen)
        args = (x[:, :-1], x[:, 1:]) if variant == "plain" else (x[:, :-1], x[:, 1:], pos.clone())
        loss = engine(*args)
        engine.backward(loss)
        engine.step()

    return timed(step, a.steps, a.warmup, device)


def attention_times(a: argparse.Namespace, cfg, device: torch.device, variant: str) -> list[float]:
    """One layer's attention forward + backward at the model's (heads, KV heads, head dim)."""
    from megatrain.model import documents, kernels

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m, pos = cfg.model, layouts(a.mb, a.seq, a.docs, device)
    q = torch.randn(a.mb, m.num_heads, a.seq, m.head_dim, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(a.mb, m.kv_heads, a.seq, m.head_dim, device=device, dtype=dtype, requires_grad=True)
            for _ in range(2))
    if variant != "plain":
        documents.configure(variant)

    def run(i: int) -> None:
        layout = None if variant == "plain" else documents.DocumentLayout(pos.clone())  # built per micro-batch
        kernels.attention(q, k, v, 0.0, layout).sum().backward()

    return timed(run, a.steps, a.warmup, device)


def loader_times(a: argparse.Namespace, n_batches: int = 500) -> dict[str, float]:
    """Seconds per sample of micro-batch assembly: plain (tokens, labels) against (tokens, labels,
    position_ids) with the eod loss mask, from a synthetic dataset of documents ~seq/docs long."""
    import functools
    import tempfile

    import numpy as np

    from megatrain.data import loader as L
    from megatrain.data.gpt_dataset import GPTDataset
    from megatrain.data.indexed import IndexedDataset, IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        with IndexedDatasetBuilder(f"{tmp}/docs", 32000) as b:
            for n in rng.geometric(a.docs / a.seq, size=(n_batches * a.mb * a.seq) // max(1, a.seq // a.docs) + 10):
                b.add_sequence(rng.integers(0, 32000, int(n)))
                b.end_document()
            b.finalize()
        ds = GPTDataset(IndexedDataset(f"{tmp}/docs"), (0, IndexedDataset(f"{tmp}/docs").num_documents),
                        seq_len=a.seq, num_samples=None, seed=0, cache_dir=tmp)
        wrapped = L._Wrapped(ds)
        laid = L._WithStarts(wrapped)
        coll = functools.partial(L._collate_documents, positions=True, mask_loss=True)
        ids = rng.integers(0, len(ds), n_batches * a.mb)
        best: dict[str, float] = {}
        variants = [("plain", wrapped.__getitem__, L._collate), ("documents", laid.__getitem__, coll)]
        for name, get, collate in variants * 3:
            t0 = time.perf_counter()
            for k in range(0, ids.size, a.mb):
                collate([get(int(i)) for i in ids[k:k + a.mb]])
            best[name] = min(best.get(name, float("inf")), (time.perf_counter() - t0) / ids.size)
    return best


def available_variants(device: torch.device) -> list[str]:
    from megatrain.model import documents

    out = ["plain"]
    if device.type == "cuda":
        out += [v for v, ok in (("flex", documents.flex_available()), ("varlen", documents.varlen_available())) if ok]
    return out + ["sdpa"]


def record(kind: str, variant: str, a: argparse.Namespace, times: list[float], base: float | None) -> dict:
    med = statistics.median(times)
    res = {"bench": "documents", "kind": kind, "variant": variant, "preset": a.preset, "seq": a.seq, "mb": a.mb,
           "docs": a.docs, "compile": bool(a.compile), "ckpt": a.ckpt, "median_ms": round(1e3 * med, 3),
           "min_ms": round(1e3 * min(times), 3), "n_timed": len(times),
           "vs_plain": round(med / base, 3) if base else None, "gpu": gpu_name(), "torch": torch.__version__}
    emit(res)
    return res


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a = parse_args(argv)
    if a.loader:
        best = loader_times(a)
        for name, sec in best.items():
            emit({"bench": "documents", "kind": "loader", "variant": name, "seq": a.seq, "mb": a.mb, "docs": a.docs,
                  "us_per_sample": round(1e6 * sec, 1), "samples_per_s": round(1 / sec)})
        log.info("loader: %s", ", ".join(f"{k} {1e6 * v:.1f} us/sample" for k, v in best.items()))
        return
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    variants = a.variants.split(",") if a.variants else available_variants(device)
    cfg, built = build(a, device)
    rows = []
    for kind in ("step", "attention") if a.attention_only else ("step",):
        base = None
        for variant in variants:
            times = (step_times(a, cfg, built.engine, device, variant) if kind == "step"
                     else attention_times(a, cfg, device, variant))
            if variant == "plain":
                base = statistics.median(times)
            rows.append(record(kind, variant, a, times, base))
    log.info("%-9s %-7s %10s %8s", "kind", "variant", "median ms", "/plain")
    for r in rows:
        log.info("%-9s %-7s %10.2f %8s", r["kind"], r["variant"], r["median_ms"], r["vs_plain"] or "-")
    log.info("documents bench: %s seq %d x mb %d, %d documents per sample, %d variants on %s", a.preset, a.seq, a.mb,
             a.docs, len(variants), gpu_name())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
