#!/usr/bin/env python
"""Data pipeline benchmark: preprocessing throughput, sample-index build time, random sample reads.

    python bench/bench_data.py [--workdir /tmp/megatrain-bench] [--tokens 1e9] [--json out.json]

1. Preprocessing: trains a 32,000-entry SentencePiece BPE model on generated text (Zipf-distributed
   pseudo-words), then runs tools/preprocess_data.py's engine over ~--corpus-mb MB of JSONL with 1 and 2
   workers; reports MB/s in total and per worker.
2. Index build for a --tokens (default 10^9) token dataset: the .idx is written from synthetic document
   lengths, the .bin is a sparse file of the right size (no 2 GB of real tokens needed); times writing the
   index, opening + checking it, and building the GPT document/sample/shuffle indices for seq_len 2048
   (cold, then from the .npy cache).
3. Random reads: samples/s of GPTDataset[i] (seq_len 2048, random i) in one process, on a 10^8-token
   dataset of random tokens resident in the page cache (mean document length 1000 and 100 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megatrain.data.gpt_dataset import GPTDataset  # noqa: E402
from megatrain.data.indexed import IndexedDataset, IndexedDatasetBuilder, write_index  # noqa: E402
from megatrain.data.preprocess import PreprocessOptions, preprocess  # noqa: E402
from megatrain.data.tokenizer import train_tokenizer  # noqa: E402

SEQ = 2048


def _words(rng: random.Random, n: int) -> list[str]:
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "an", "or", "el", "is", "um", "ba", "de", "gi",
            "po", "qu", "th", "st", "ch", "ex", "in", "on", "re", "pr", "tr", "al", "er"]
    return ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def make_corpus(path: str, mb: float, seed: int = 0) -> int:
    """JSONL of documents of Zipf-distributed pseudo-words, digits and punctuation; returns bytes written."""
    rng = random.Random(seed)
    vocab = _words(rng, 60_000)
    weights = [1.0 / (i + 1) for i in range(len(vocab))]
    size, target = 0, int(mb * 1e6)
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            words = rng.choices(vocab, weights, k=rng.randint(50, 600))
            for i in range(0, len(words), rng.randint(8, 20)):
                words[i] = words[i].capitalize() + rng.choice([",", ".", "", " 19" + str(rng.randint(10, 99))])
            line = json.dumps({"text": " ".join(words)}) + "\n"
            f.write(line)
            size += len(line.encode())
    return size


def bench_preprocess(workdir: str, corpus_mb: float) -> dict:
    corpus = os.path.join(workdir, "corpus.jsonl")
    nbytes = make_corpus(corpus, corpus_mb)
    start = time.perf_counter()

    def texts():
        with open(corpus) as f:
            for line in f:
                yield json.loads(line)["text"]

    model = train_tokenizer(texts(), 32000, os.path.join(workdir, "tok32k"), input_sentence_size=300_000)
    out = {"corpus_mb": round(nbytes / 1e6, 1), "tokenizer_train_s": round(time.perf_counter() - start, 1)}
    for workers in (1, 2):
        self0, kids0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        res = preprocess(PreprocessOptions(inputs=[corpus], output_prefix=os.path.join(workdir, f"pre{workers}"),
                                           tokenizer_model=model, workers=workers, append_eod=True, progress=False))
        self1, kids1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        parent_cpu = (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime)
        worker_cpu = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
        if workers == 1:  # tokenizes in the process itself
            worker_cpu, parent_cpu = parent_cpu, 0.0
        mbps = res.bytes / 1e6 / res.seconds
        out[f"workers_{workers}"] = {
            "seconds": round(res.seconds, 2), "MB_per_s": round(mbps, 2),
            "MB_per_s_per_worker": round(mbps / workers, 2),
            # contention-proof figure: MB per CPU-second a worker spends (shared machines skew wall time)
            "MB_per_worker_cpu_s": round(res.bytes / 1e6 / max(worker_cpu, 1e-9), 2),
            "worker_cpu_s": round(worker_cpu, 2), "parent_cpu_s": round(parent_cpu, 2),
            "tokens": res.tokens, "documents": res.documents}
    return out


def synth_dataset(prefix: str, num_tokens: int, mean_doc: int, seed: int = 0) -> dict:
    """A num_tokens dataset: lengths drawn from a lognormal, a sparse .bin. Returns timings."""
    rng = np.random.default_rng(seed)
    n_docs = max(1, num_tokens // mean_doc)
    lengths = rng.lognormal(np.log(mean_doc) - 0.5, 1.0, n_docs)
    lengths = np.maximum(1, (lengths * num_tokens / lengths.sum()).astype(np.int64))
    lengths[-1] += num_tokens - lengths.sum()
    start = time.perf_counter()
    write_index(prefix + ".idx", np.uint16, lengths.astype(np.int32), np.arange(n_docs + 1, dtype=np.int64))
    t_idx = time.perf_counter() - start
    with open(prefix + ".bin", "wb") as f:
        f.truncate(num_tokens * 2)  # sparse: reads as zeros
    return {"documents": int(n_docs), "write_idx_s": round(t_idx, 2)}


def bench_index(workdir: str, num_tokens: int, mean_doc: int) -> dict:
    prefix = os.path.join(workdir, f"synth_{mean_doc}")
    out = synth_dataset(prefix, num_tokens, mean_doc)
    start = time.perf_counter()
    ix = IndexedDataset(prefix, verify="sizes")
    out["open_and_check_s"] = round(time.perf_counter() - start, 2)
    cache = os.path.join(workdir, f"cache_{mean_doc}")
    shutil.rmtree(cache, ignore_errors=True)
    for label, epochs in (("1_epoch", 1), ("3_epochs", 3)):
        n = (epochs * num_tokens - 1) // SEQ - 10
        start = time.perf_counter()
        ds = GPTDataset(ix, (0, ix.num_documents), seq_len=SEQ, num_samples=n, seed=1, cache_dir=cache)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        GPTDataset(ix, (0, ix.num_documents), seq_len=SEQ, num_samples=n, seed=1, cache_dir=cache)
        warm = time.perf_counter() - start
        out[f"gpt_index_{label}"] = {"samples": len(ds), "build_s": round(cold, 2), "cached_load_s": round(warm, 3)}
    return out


def bench_reads(ds: GPTDataset, n: int = 200_000) -> dict:
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(ds), n).tolist()
    for i in idx[:2000]:
        ds[i]
    start, cpu = time.perf_counter(), time.process_time()
    for i in idx:
        ds[i]
    secs, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"samples_per_s": int(n / secs), "us_per_sample": round(secs / n * 1e6, 2),
            "samples_per_cpu_s": int(n / cpu)}


def bench_resident_reads(workdir: str, num_tokens: int, mean_doc: int) -> dict:
    """Reads from a dataset whose tokens are real bytes in the page cache."""
    prefix = os.path.join(workdir, f"real_{mean_doc}")
    rng = np.random.default_rng(1)
    with IndexedDatasetBuilder(prefix, vocab_size=32000, hash_bin=False) as b:
        left = num_tokens
        while left > 0:
            lengths = np.maximum(1, rng.lognormal(np.log(mean_doc) - 0.5, 1.0, 10_000).astype(np.int64))
            lengths = lengths[np.cumsum(lengths) <= left] if lengths.sum() > left else lengths
            if lengths.size == 0:
                lengths = np.array([left])
            b.add_sequences(rng.integers(0, 32000, int(lengths.sum()), dtype=np.int64), lengths)
            left -= int(lengths.sum())
        b.finalize()
    ix = IndexedDataset(prefix)
    ds = GPTDataset(ix, (0, ix.num_documents), seq_len=SEQ, num_samples=None, seed=1,
                    cache_dir=os.path.join(workdir, "cache_real"))
    return {"tokens": num_tokens, "mean_doc": mean_doc, **bench_reads(ds)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/megatrain-bench")
    p.add_argument("--tokens", type=float, default=1e9)
    p.add_argument("--corpus-mb", type=float, default=20)
    p.add_argument("--skip-preprocess", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    results = {"date": time.strftime("%Y-%m-%d"), "load_average_at_start": os.getloadavg(), "machine": f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} CPUs, Python {platform.python_version()}, numpy {np.__version__}"}
    if not args.skip_preprocess:
        results["preprocess"] = bench_preprocess(args.workdir, args.corpus_mb)
        print(json.dumps({"preprocess": results["preprocess"]}), flush=True)
    for mean_doc in (1000, 100):
        results[f"index_{int(args.tokens):.0e}_tokens_mean_doc_{mean_doc}"] = r = bench_index(
            args.workdir, int(args.tokens), mean_doc)
        print(json.dumps({f"index mean_doc={mean_doc}": r}), flush=True)
    for mean_doc in (1000, 100):
        results[f"resident_reads_mean_doc_{mean_doc}"] = r = bench_resident_reads(args.workdir, 100_000_000, mean_doc)
        print(json.dumps({f"resident reads mean_doc={mean_doc}": r}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
