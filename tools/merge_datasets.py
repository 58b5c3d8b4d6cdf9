#!/usr/bin/env python
"""Concatenate indexed datasets (e.g. the shards of a --partition run) into one, in the order given.

    python tools/merge_datasets.py --input data/shard_0 data/shard_1 --output-prefix data/corpus
    python tools/merge_datasets.py --input data/shards/ --output-prefix data/corpus   # every *.idx, sorted

The result is byte-identical to tokenizing all shards' input in one run. Inputs must share dtype,
vocabulary size and tokenizer (checked through their sidecars).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatrain.data.indexed import DataFormatError, merge_datasets, normalize_prefix  # noqa: E402
from megatrain.files import check_not_inputs  # noqa: E402
from megatrain.telemetry.console import pipe_safe  # noqa: E402


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def expand_inputs(items: list[str]) -> list[str]:
    prefixes = []
    for item in items:
        if os.path.isdir(item):
            found = sorted((os.path.join(item, n[:-4]) for n in os.listdir(item) if n.endswith(".idx")), key=_natural)
            if not found:
                raise DataFormatError(f"--input {item}: directory holds no .idx files")
            prefixes.extend(found)
        else:
            prefixes.append(normalize_prefix(item))
    return prefixes


@pipe_safe
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes, or directories of them")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        prefixes = expand_inputs(args.input)
        # An output inside an input directory would be merged into itself by the next run over that directory.
        check_not_inputs([("--output-prefix", normalize_prefix(args.output_prefix) + ".idx")],
                         [d for d in args.input if os.path.isdir(d)], error=DataFormatError,
                         fix="choose another --output-prefix")
        side = merge_datasets(prefixes, normalize_prefix(args.output_prefix), tool="megatrain tools/merge_datasets.py")
    except (DataFormatError, ValueError) as e:
        print(f"merge_datasets: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a folder without write permission, a full disk: the partial files are already gone
        print(f"merge_datasets: error: {e.filename or args.output_prefix}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the outputs are written under temporary names: nothing half-written remains
        print("merge_datasets: interrupted; no output written", file=sys.stderr)
        return 130
    secs = time.perf_counter() - start
    size = os.path.getsize(normalize_prefix(args.output_prefix) + ".bin")
    print(f"merge_datasets: {len(prefixes)} datasets -> {args.output_prefix}: {side['num_documents']:,} documents, "
          f"{side['num_tokens']:,} tokens, {size / 1e6:.1f} MB in {secs:.1f} s ({size / 1e6 / max(secs, 1e-9):.0f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
