"""The LLaMA model and its accounting (parameters, FLOPs, memory)."""

from megatrain.model.accounting import flops_per_token, num_params
from megatrain.model.llama import Ctx, LlamaModel, Part, build_model, layer_parts

__all__ = ["Ctx", "LlamaModel", "Part", "build_model", "flops_per_token", "layer_parts", "num_params"]
