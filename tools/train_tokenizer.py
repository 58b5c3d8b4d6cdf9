#!/usr/bin/env python
"""Train a SentencePiece BPE tokenizer (LLaMA ids: unk 0, bos 1, eos 2; byte fallback) from JSONL or text.

    python tools/train_tokenizer.py --input data/*.jsonl --vocab-size 32000 --output-prefix tok/llama

Writes PREFIX.model and PREFIX.vocab. Large inputs are sampled: at most --input-sentence-size lines
(uniformly at random) are used for training.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.data.indexed import DataFormatError  # noqa: E402
from megatrain.data.preprocess import PreprocessOptions, check_options, iter_records, _is_json  # noqa: E402
from megatrain.data.tokenizer import Tokenizer, check_tokenizer_outputs, train_tokenizer  # noqa: E402
from megatrain.telemetry.console import pipe_safe  # noqa: E402

logger = logging.getLogger("train_tokenizer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL / .jsonl.gz / .txt files, globs or directories")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--no-byte-fallback", action="store_true", help="map unknown characters to <unk> instead of bytes")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="sample at most this many lines for training (0 = use all)")
    p.add_argument("--user-defined-symbols", default="", help="comma-separated pieces that are never split")
    p.add_argument("--num-threads", type=int, default=None)
    return p.parse_args(argv)


class _Texts:
    """Texts of every record; bad records are skipped and counted (the tokenizer only needs text)."""

    def __init__(self, files: list[str], keys: list[str]):
        self.files, self.keys, self.records, self.bad, self.bytes, self.usable = files, keys, 0, 0, 0, 0

    def __iter__(self):
        import json

        for path in self.files:
            is_json = _is_json(path)
            for _, raw in iter_records(path):
                self.records += 1
                self.bytes += len(raw)
                if not is_json:
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:  # never learn pieces from U+FFFD replacement characters
                        self.bad += 1
                        continue
                    self.usable += bool(text.strip())
                    yield text
                    continue
                try:
                    obj = json.loads(raw)
                    texts = [obj[k] for k in self.keys if isinstance(obj.get(k), str)]
                except (ValueError, AttributeError):
                    texts = []
                if not texts:
                    self.bad += bool(raw.strip())
                self.usable += any(t.strip() for t in texts)
                yield from texts


SPECIAL_PIECES = 3  # <unk>, <s>, </s>
BYTE_PIECES = 256  # byte fallback: one piece per byte value


def check_tokenizer_args(args: argparse.Namespace) -> None:
    """Numbers SentencePiece would reject with an internal assertion (or silently misuse), named here."""
    symbols = [s for s in args.user_defined_symbols.split(",") if s]
    least = SPECIAL_PIECES + len(symbols) + (0 if args.no_byte_fallback else BYTE_PIECES) + 1
    if args.vocab_size < least:
        raise ValueError(f"--vocab-size {args.vocab_size}: too small; the {SPECIAL_PIECES} special pieces"
                         + ("" if args.no_byte_fallback else f", {BYTE_PIECES} byte-fallback pieces")
                         + (f", {len(symbols)} --user-defined-symbols" if symbols else "")
                         + f" and at least one piece per character of the text need more than {least - 1} "
                           f"(LLaMA uses 32000)")
    if args.vocab_size > 1_000_000:
        raise ValueError(f"--vocab-size {args.vocab_size}: SentencePiece's BPE trainer is meant for vocabularies up "
                         f"to about 1,000,000 (LLaMA uses 32000, Llama 3 128256)")
    if not 0 < args.character_coverage <= 1:
        raise ValueError(f"--character-coverage {args.character_coverage}: must be in (0, 1] (e.g. 0.9995)")
    if args.input_sentence_size < 0:
        raise ValueError(f"--input-sentence-size {args.input_sentence_size}: must be >= 0 (0 = use every line)")
    if args.num_threads is not None and args.num_threads < 1:
        raise ValueError(f"--num-threads {args.num_threads}: must be >= 1")


def explain(msg: str, args: argparse.Namespace) -> str:
    """SentencePiece's 'Vocabulary size is smaller than required_chars. A vs B' in the words of this tool."""
    import re

    m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
    if m:
        return (f"--vocab-size {m.group(1)}: the text's characters and the special pieces need {m.group(2)} "
                f"pieces; raise --vocab-size above {m.group(2)} or lower --character-coverage "
                f"(now {args.character_coverage})")
    return msg


@pipe_safe
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    texts = None
    try:
        check_tokenizer_args(args)
        files = check_options(PreprocessOptions(inputs=args.input, output_prefix=args.output_prefix,
                                                tokenizer_model=""))
        check_tokenizer_outputs(args.output_prefix, files + [p for p in args.input if os.path.isdir(p)])
        texts = _Texts(files, args.json_keys)
        start = time.perf_counter()
        symbols = [s for s in args.user_defined_symbols.split(",") if s]
        path = train_tokenizer(texts, args.vocab_size, args.output_prefix, model_type=args.model_type,
                               byte_fallback=not args.no_byte_fallback, character_coverage=args.character_coverage,
                               input_sentence_size=args.input_sentence_size, user_defined_symbols=symbols,
                               num_threads=args.num_threads)
        tok = Tokenizer(path)
    except (DataFormatError, ValueError) as e:
        msg = str(e)
        if texts is not None and texts.records and texts.usable == 0:  # SentencePiece's own words do not say why
            msg = (f"no usable text in {texts.records:,} records of --input ({texts.bad:,} without a string under "
                   f"--json-keys {' '.join(args.json_keys)}); check the keys and the input files")
        print(f"train_tokenizer: error: {explain(msg, args)}", file=sys.stderr)
        return 1
    except OSError as e:  # an output folder without write permission, a disk that is full
        print(f"train_tokenizer: error: {e.filename or args.output_prefix}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the outputs are written under temporary names: nothing half-written remains
        print("train_tokenizer: interrupted; no output written", file=sys.stderr)
        return 130
    secs = time.perf_counter() - start
    if texts.bad:
        logger.warning("%d records had no usable text under --json-keys %s", texts.bad, " ".join(args.json_keys))
    print(f"train_tokenizer: {tok.vocab_size:,}-entry {args.model_type} model from {texts.records:,} records "
          f"({texts.bytes / 1e6:.1f} MB) in {secs:.1f} s -> {path} (sha256 {tok.sha256[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
