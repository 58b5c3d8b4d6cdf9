"""Write (and read back) a llama.cpp GGUF file through the ``gguf`` package.

What llama.cpp's ``llama`` architecture expects, as its ``convert_hf_to_gguf.py`` writes it:

- hyperparameters under ``llama.*`` (context, widths, heads, RoPE base and dimension, RMSNorm eps);
- the sentencepiece vocabulary (``tokenizer.ggml.model = llama``) with per-piece scores and
  token types, and the special ids;
- tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ...), with Q and K rows
  permuted: HF pairs RoPE dimensions (i, i + D/2) ("rotate half"), llama.cpp's kernel for this
  architecture pairs (2i, 2i + 1), so within every head the two halves are interleaved;
- 1-D tensors (norms) always in F32; Llama-3.1 RoPE scaling as a ``rope_freqs`` factor tensor.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from megatrain.config import ModelConfig
from megatrain.convert.source import ConversionError, Source

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF "rotate half" rows -> llama.cpp interleaved rows, per head: (h, 2, D/2, C) -> (h, D/2, 2, C)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg: ModelConfig) -> torch.Tensor:
    """Per-frequency divisors llama.cpp applies for Llama-3.1 scaling (``rope_freqs``): 1 for short
    wavelengths, ``factor`` for long ones, interpolated between."""
    s = cfg.rope_scaling
    d = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    low, high = s.original_max_position_embeddings / s.low_freq_factor, \
        s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high:
            out.append(1.0)
        elif wavelen > low:
            out.append(s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / \
                (s.high_freq_factor - s.low_freq_factor)
            out.append(1.0 / ((1 - smooth) / s.factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _names() -> dict[str, str]:
    import gguf

    T, N = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    return {"embed": N[T.TOKEN_EMBD], "norm": N[T.OUTPUT_NORM], "head": N[T.OUTPUT], "rope": N[T.ROPE_FREQS],
            "input_layernorm": N[T.ATTN_NORM], "self_attn.q_proj": N[T.ATTN_Q], "self_attn.k_proj": N[T.ATTN_K],
            "self_attn.v_proj": N[T.ATTN_V], "self_attn.o_proj": N[T.ATTN_OUT],
            "post_attention_layernorm": N[T.FFN_NORM], "mlp.gate_proj": N[T.FFN_GATE],
            "mlp.up_proj": N[T.FFN_UP], "mlp.down_proj": N[T.FFN_DOWN]}


def gguf_tensors(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical megatrain tensors -> {llama.cpp name: fp32 tensor}, Q/K permuted, in file order."""
    from megatrain.model.hf import to_hf_state_dict

    hf = to_hf_state_dict(weights, cfg)
    names = _names()
    out = {names["embed"] + ".weight": hf["model.embed_tokens.weight"]}
    for i in range(cfg.num_layers):
        for part in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                     "mlp.down_proj"):
            w = hf[f"model.layers.{i}.{part}.weight"]
            if part == "self_attn.q_proj":
                w = permute_qk(w, cfg.num_heads)
            elif part == "self_attn.k_proj":
                w = permute_qk(w, cfg.kv_heads)
            out[names[part].format(bid=i) + ".weight"] = w
    out[names["norm"] + ".weight"] = hf["model.norm.weight"]
    if not cfg.tie_embeddings:  # llama.cpp falls back to token_embd when output is absent
        out[names["head"] + ".weight"] = hf["lm_head.weight"]
    if cfg.rope_scaling is not None:
        out[names["rope"] + ".weight"] = llama3_rope_factors(cfg)
    return {n: t.detach().float().contiguous() for n, t in out.items()}


def canonical_from_gguf_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`gguf_tensors` (the ``rope_freqs`` tensor is dropped)."""
    from megatrain.model.hf import from_hf_state_dict

    names = _names()
    inv = {names["embed"] + ".weight": "model.embed_tokens.weight", names["norm"] + ".weight": "model.norm.weight",
           names["head"] + ".weight": "lm_head.weight"}
    for i in range(cfg.num_layers):
        for part in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                     "mlp.down_proj"):
            inv[names[part].format(bid=i) + ".weight"] = f"model.layers.{i}.{part}.weight"
    hf = {}
    for name, t in tensors.items():
        if name in inv:
            hf[inv[name]] = t
    for i in range(cfg.num_layers):
        q, k = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.self_attn.k_proj.weight"
        hf[q], hf[k] = unpermute_qk(hf[q], cfg.num_heads), unpermute_qk(hf[k], cfg.kv_heads)
    return from_hf_state_dict(hf, cfg)


# --------------------------------------------------------------------------- tensor types


def encode_tensor(t: torch.Tensor, outtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw ggml type or None) as llama.cpp stores it: 1-D in F32; Q8_0 needs rows of whole
    32-element blocks, else the tensor falls back to F16 as llama.cpp's converter does."""
    import gguf

    a = t.detach().float().numpy()
    if a.ndim == 1 or outtype == "f32":
        return a.astype(np.float32), None
    if outtype == "f16":
        return a.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if a.shape[-1] % block:
        return a.astype(np.float16), None
    return gguf.quants.quantize(a, qtype), qtype


def decode_tensor(data: np.ndarray, qtype: Any, shape: tuple[int, ...]) -> torch.Tensor:
    import gguf

    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, qtype)).reshape(shape).astype(
        np.float32))


def round_like_gguf(t: torch.Tensor, outtype: str) -> torch.Tensor:
    """What ``t`` reads back as after :func:`encode_tensor` (the reference for verification)."""
    a, qtype = encode_tensor(t, outtype)
    if qtype is None:
        return torch.from_numpy(a.astype(np.float32)).reshape(t.shape)
    return decode_tensor(a, qtype, tuple(t.shape))


def rounded_canonical(cfg: ModelConfig, weights: dict[str, torch.Tensor], outtype: str) -> dict[str, torch.Tensor]:
    """The canonical weights as a GGUF of ``outtype`` holds them."""
    g = {n: round_like_gguf(t, outtype) for n, t in gguf_tensors(cfg, weights).items()}
    return canonical_from_gguf_tensors(cfg, g)


# --------------------------------------------------------------------------- vocabulary


def sentencepiece_vocab(tok_path: Path) -> tuple[list[bytes], list[float], list[int], dict]:
    """(pieces, scores, gguf token types, normalizer flags) of a sentencepiece model."""
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    proto_types, flags = None, {"add_dummy_prefix": True, "remove_extra_whitespaces": True}
    try:  # the model proto has the exact piece types (user-defined included) and normalizer flags
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(tok_path.read_bytes())
        proto_types = [int(p.type) for p in proto.pieces]
        flags = {"add_dummy_prefix": proto.normalizer_spec.add_dummy_prefix,
                 "remove_extra_whitespaces": proto.normalizer_spec.remove_extra_whitespaces}
    except Exception:  # protobuf missing: fall back to the processor's predicates
        pass
    T = gguf.TokenType
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(float(sp.get_score(i)))
        if proto_types is not None:
            types.append(proto_types[i])  # sentencepiece's enum numbers are gguf's TokenType numbers
        elif sp.is_unknown(i):
            types.append(int(T.UNKNOWN))
        elif sp.is_control(i):
            types.append(int(T.CONTROL))
        elif sp.is_unused(i):
            types.append(int(T.UNUSED))
        elif sp.is_byte(i):
            types.append(int(T.BYTE))
        else:
            types.append(int(T.NORMAL))
    return pieces, scores, types, flags


def add_vocab(writer: Any, tok_path: Path, tok: Any, vocab_size: int) -> None:
    import gguf

    pieces, scores, types, flags = sentencepiece_vocab(tok_path)
    for i in range(len(pieces), vocab_size):  # padded embedding rows: placeholders, as llama.cpp's converter does
        pieces.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(bool(flags["add_dummy_prefix"]))
    writer.add_remove_extra_whitespaces(bool(flags["remove_extra_whitespaces"]))
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_unk_token_id(tok.unk_id)
    if tok.pad_id >= 0:
        writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


# --------------------------------------------------------------------------- file


def _add_hparams(w: Any, cfg: ModelConfig, outtype: str, name: str) -> None:
    import gguf

    w.add_name(name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.ffn_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    ft = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    w.add_file_type(int(ft))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(out_file: Path, src: Source, outtype: str, tok_path: Optional[Path], tok: Any,
               advance: Callable[[int], None], name: str = "megatrain") -> int:
    """Write the GGUF to ``out_file``; returns the tensor bytes written."""
    import gguf

    if outtype not in OUTTYPES:
        raise ConversionError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    if tok_path is None:
        raise ConversionError("GGUF needs the sentencepiece vocabulary: pass --tokenizer PATH (the .model file the "
                              "model was trained with)")
    writer = gguf.GGUFWriter(str(out_file), "llama")
    _add_hparams(writer, src.model, outtype, name)
    add_vocab(writer, tok_path, tok, src.model.vocab_size)
    total = 0
    for tname, t in gguf_tensors(src.model, src.weights).items():
        data, qtype = encode_tensor(t, outtype)
        writer.add_tensor(tname, data, raw_dtype=qtype)
        total += data.nbytes
        advance(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return total


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata {key: value}, {tensor name: fp32 tensor in PyTorch shape}) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        fields[key] = field.contents()
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dimensions innermost first
        tensors[t.name] = decode_tensor(t.data, t.tensor_type, shape)
    return fields, tensors
