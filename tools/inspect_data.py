#!/usr/bin/env python
"""Check and look into indexed datasets.

    python tools/inspect_data.py verify PREFIX [--vocab-size N] [--full]   # exit 0 only if every check holds
    python tools/inspect_data.py stats PREFIX                              # documents, tokens, length percentiles
    python tools/inspect_data.py decode PREFIX --document I --tokenizer-model M
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megatrain.data.indexed import DataFormatError, IndexedDataset  # noqa: E402
from megatrain.telemetry.console import pipe_safe  # noqa: E402


def cmd_verify(args) -> int:
    if args.vocab_size is not None and args.vocab_size <= 0:
        print(f"inspect_data verify: error: --vocab-size {args.vocab_size}: must be positive", file=sys.stderr)
        return 1
    start = time.perf_counter()
    ds = IndexedDataset(args.prefix, verify="full" if args.full else "sizes", vocab_size=args.vocab_size)
    secs = time.perf_counter() - start
    mode = "full (every token)" if args.full else "sizes"
    print(f"inspect_data verify: OK {ds.prefix}: {ds.num_documents:,} documents, {len(ds):,} sequences, "
          f"{ds.num_tokens:,} {ds.dtype.name} tokens; checks: {mode}; {secs:.2f} s")
    return 0


def cmd_stats(args) -> int:
    ds = IndexedDataset(args.prefix)
    cum = np.concatenate([[0], np.cumsum(ds.sequence_lengths, dtype=np.int64)])
    doc_tokens = cum[ds.document_indices[1:]] - cum[ds.document_indices[:-1]]
    stats = {"prefix": ds.prefix, "dtype": ds.dtype.name, "documents": ds.num_documents, "sequences": len(ds),
             "tokens": ds.num_tokens, "empty_documents": int((doc_tokens == 0).sum()) if doc_tokens.size else 0,
             "bin_bytes": os.path.getsize(ds.bin_path)}
    if doc_tokens.size:
        pct = [0, 1, 10, 50, 90, 99, 100]
        stats["document_tokens"] = {f"p{q}": int(v) for q, v in zip(pct, np.percentile(doc_tokens, pct))}
        stats["document_tokens"]["mean"] = round(float(doc_tokens.mean()), 1)
    if ds.sidecar:
        stats["sidecar"] = {k: ds.sidecar.get(k) for k in ("vocab_size", "eod_id", "tokenizer_sha256", "tool")}
    print(json.dumps(stats, indent=2))
    return 0


def cmd_decode(args) -> int:
    from megatrain.data.tokenizer import Tokenizer

    ds = IndexedDataset(args.prefix)
    tok = Tokenizer(args.tokenizer_model)
    sha = (ds.sidecar or {}).get("tokenizer_sha256")
    if sha and sha != tok.sha256:
        print(f"inspect_data: warning: {ds.sidecar_path} records tokenizer {sha[:12]}..., "
              f"{args.tokenizer_model} is {tok.sha256[:12]}...", file=sys.stderr)
    try:
        if args.document < 0:
            raise IndexError(f"must be in [0, {ds.num_documents})")
        tokens = ds.get_document(args.document)
    except IndexError as e:
        print(f"inspect_data decode: error: --document {args.document}: {e}", file=sys.stderr)
        return 1
    lo, hi = (int(tokens.min()), int(tokens.max())) if tokens.size else (0, 0)
    if not args.ids and (lo < 0 or hi >= tok.vocab_size):
        bad = hi if hi >= tok.vocab_size else lo
        print(f"inspect_data decode: error: document {args.document} holds token id {bad}, outside "
              f"{args.tokenizer_model}'s {tok.vocab_size} pieces; wrong tokenizer? (--ids prints the raw ids)",
              file=sys.stderr)
        return 1
    print(tok.decode(tokens.tolist()) if not args.ids else " ".join(map(str, tokens.tolist())))
    return 0


@pipe_safe
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="run every check of the format spec")
    v.add_argument("prefix")
    v.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (default: from the sidecar)")
    v.add_argument("--full", action="store_true", help="also read every token and check it against the vocabulary")
    s = sub.add_parser("stats", help="documents, tokens, length percentiles")
    s.add_argument("prefix")
    d = sub.add_parser("decode", help="print a document as text")
    d.add_argument("prefix")
    d.add_argument("--document", type=int, required=True)
    d.add_argument("--tokenizer-model", required=True)
    d.add_argument("--ids", action="store_true", help="print token ids instead of text")
    args = p.parse_args(argv)
    try:
        return {"verify": cmd_verify, "stats": cmd_stats, "decode": cmd_decode}[args.cmd](args)
    except (DataFormatError, ValueError) as e:
        print(f"inspect_data {args.cmd}: FAILED: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
