#!/usr/bin/env python3
"""Convert checkpoints: megatrain <-> Hugging Face, megatrain -> GGUF, reshard. See docs/conversion.md.

Thin wrapper over ``megatrain.convert.cli`` (also installed as ``megatrain-convert``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megatrain.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
