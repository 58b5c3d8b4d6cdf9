"""torch.compile of the transformer blocks, in place.

Each block is compiled on its own (``nn.Module.compile``) rather than the whole
model: one graph per block keeps compile time to that of a single layer (with
``inline_inbuilt_nn_modules`` every block reuses the first block's code, its
weights being graph inputs), and leaves the embedding, the chunked loss and
DeepSpeed's hooks outside the graph. Inside a compiled block the kernels module
takes the plain-PyTorch references (it checks ``torch.compiler.is_compiling``),
so Inductor sees ordinary ops and fuses RMSNorm, RoPE, SwiGLU and the residual
adds with their neighbours.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def apply_compile(model: nn.Module, seq_len: Optional[int] = None, mode: Optional[str] = None,
                  backend: str = "inductor") -> int:
    """Compile every ``Block`` in ``model`` (a LlamaModel or a pipeline stage); returns how many.

    ``seq_len`` pre-builds the RoPE tables outside the graph; all blocks then share one table
    cache so the compiled code's guards see the same tensors in every layer (no recompiles).
    """
    from megatrain.model.llama import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        return 0
    shared = blocks[0].attn.rotary
    device = next(blocks[0].parameters()).device
    if seq_len:
        shared.tables(seq_len, device)
    for blk in blocks:
        blk.attn.rotary = shared  # identical tables (same config); one object, one set of guards
        blk.compile(backend=backend, mode=mode, dynamic=False)
    # headroom for a few shape variants (train / eval lengths) without falling back to eager
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    log.info("torch.compile: %d blocks (mode %s)", len(blocks), mode or "default")
    return len(blocks)
