#!/usr/bin/env python
"""Tokenize JSONL (.gz too) or plain text into a Megatron indexed dataset (PREFIX.bin/.idx + PREFIX.json).

    python tools/preprocess_data.py --input data/*.jsonl --output-prefix data/corpus \
        --tokenizer-model tok.model --workers 8 --append-eod

Flag names follow Megatron-LM's tools/preprocess_data.py. With several --json-keys, each key gets its own
dataset PREFIX_KEY (Megatron names them PREFIX_KEY_document). A Slurm array can tokenize shards with
--partition I --num-partitions K; tools/merge_datasets.py joins them (in order, byte-identical to one run).
Interrupting it (Ctrl-C, SIGTERM) leaves no PREFIX.bin/.idx behind, only nothing or the previous complete files.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.data.indexed import DataFormatError  # noqa: E402
from megatrain.data.preprocess import PreprocessOptions, preprocess  # noqa: E402
from megatrain.telemetry.console import pipe_safe  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL / .jsonl.gz / .txt files, globs or directories")
    p.add_argument("--output-prefix", required=True, help="write PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model file")
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                   choices=["SentencePieceTokenizer", "Llama2Tokenizer", "GPTSentencePieceTokenizer"],
                   help="accepted for Megatron compatibility; all mean a SentencePiece model")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to tokenize (default: text)")
    p.add_argument("--append-eod", action="store_true", help="append the end-of-document id to every document")
    p.add_argument("--prepend-bos", action="store_true", help="prepend the BOS id to every document")
    p.add_argument("--partition", type=int, default=0, help="which shard of the input to tokenize (0-based)")
    p.add_argument("--num-partitions", type=int, default=1, help="how many shards the input is cut into")
    p.add_argument("--dedup", action="store_true",
                   help="drop exact duplicate documents (by content hash; within this run/partition)")
    p.add_argument("--strict", action="store_true", help="fail on the first malformed record instead of skipping")
    p.add_argument("--text-unit", choices=["line", "file"], default="line",
                   help="plain-text inputs: one document per line (default) or per file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p.parse_args(argv)


def _terminate(signum, frame):
    # SIGTERM (Slurm preemption, kill) unwinds like Ctrl-C so that the partial files are removed.
    raise KeyboardInterrupt(f"signal {signum}")


@pipe_safe
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    opts = PreprocessOptions(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer_model=args.tokenizer_model,
        workers=args.workers, json_keys=tuple(args.json_keys), append_eod=args.append_eod,
        prepend_bos=args.prepend_bos, partition=args.partition, num_partitions=args.num_partitions,
        dedup=args.dedup, strict=args.strict, text_unit=args.text_unit, progress=not args.no_progress,
    )
    try:
        result = preprocess(opts)
    except (DataFormatError, ValueError) as e:
        print(f"preprocess_data: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a folder without write permission, a full disk: the partial files are already gone
        print(f"preprocess_data: error: {e.filename or args.output_prefix}: {e.strerror or e}; no output written",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("preprocess_data: interrupted; no output written", file=sys.stderr)
        return 130
    print(f"preprocess_data: {result.summary(opts.workers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
