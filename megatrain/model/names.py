"""Canonical parameter names: those of :class:`LlamaModel`, whatever assembly holds the parameters.

A checkpoint, the converter and the optimizer-state files all name a tensor the way the plain
model does (``blocks.<global index>.attn.qkv.weight``), so that a pipeline stage, a plain model and
a Hugging Face export agree on names. A pipeline stage (DeepSpeed's ``PipelineModule``) holds the
parts of :func:`layer_parts` as children named by their index, and tied parts under
``tied_modules.<key>``; these functions map that structure back. Nothing here imports DeepSpeed.
"""

from __future__ import annotations

import torch.nn as nn

from megatrain.config import ModelConfig
from megatrain.model.llama import LlamaModel, Part, layer_parts


def pipeline_parts(pipe: nn.Module, parts: list[Part]) -> list[tuple[str, Part, nn.Module]]:
    """(module prefix, part, module) for every part this stage holds, tied ones once."""
    out = []
    for name, module in pipe.named_children():
        if name.isdigit():
            out.append((name + ".", parts[int(name)], module))
    for key, module in getattr(pipe, "tied_modules", {}).items():
        out.append((f"tied_modules.{key}.", parts[0], module))
    return out


def canonical_prefix(part: Part) -> str:
    if part.name.startswith("block"):
        return f"blocks.{part.name[5:]}."
    return {"embed": "embed.", "norm": "norm.", "head": "head."}[part.name]


def canonical_named_parameters(module: nn.Module, cfg: ModelConfig) -> dict[str, nn.Parameter]:
    """This rank's parameters under canonical names, for a plain model or a pipeline stage. A tied
    head on the last stage is left out: its weight is the embedding."""
    if isinstance(module, LlamaModel):
        return dict(module.named_parameters())
    out = {}
    for _, part, sub in pipeline_parts(module, layer_parts(cfg)):
        if part.name == "head" and part.tie:
            continue
        for n, p in sub.named_parameters():
            out[canonical_prefix(part) + n] = p
    return out
