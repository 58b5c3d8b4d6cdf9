"""Checkpoint conversion: megatrain <-> Hugging Face safetensors, megatrain -> GGUF, offline resharding.

Every conversion goes through one pivot, the *canonical* state dict (full tensors under
``LlamaModel.state_dict()`` names; ``megatrain/checkpoint/layout.py`` cuts and merges them):

    source (megatrain checkpoint | HF directory) -> canonical tensors + ModelConfig + tokenizer
        -> writer (hf | megatrain | gguf), into a temporary name
        -> verify (logits and greedy continuations of source vs. written output)
        -> rename into place

``megatrain-convert`` / ``tools/convert_checkpoint.py`` is the command line (``cli.py``).
"""

from megatrain.convert.source import ConversionError, Source, load_source

__all__ = ["ConversionError", "Source", "load_source"]
