"""LLaMA, built from tensor-parallel layers. Plain PyTorch: no DeepSpeed in this file.

The model is a flat sequence of parts so that the same classes make both the
plain model (:class:`LlamaModel`) and the pipeline stages (``engine.py`` wraps
:func:`layer_parts` in DeepSpeed LayerSpecs):

    Embedding -> Block x L -> FinalNorm -> Head (-> loss)

Shapes: B batch, T sequence, C hidden, H query heads (this rank's), K KV heads
(this rank's), D head dim, F FFN width (this rank's), V vocabulary (this rank's).

Splitting the sequence (both chosen by the :class:`Ctx` the parts are built with):
with context parallelism every T below is this context rank's slice (T/cp of the
sample; RoPE uses the global positions, attention goes through
``parallel.context``); with sequence parallelism the residual stream between
the TP layers holds T/tp of those tokens, the TP layers gathering and scattering.

Packed documents (``data.document_mask``): ``position_ids`` (B, T), each token's position in its
document, goes with the tokens and through every block; attention is then block-causal and RoPE
uses those positions (:mod:`megatrain.model.documents`). Without it every path is the plain causal one.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatrain.config import ModelConfig
from megatrain.model import kernels
from megatrain.model.documents import layout_for
from megatrain.parallel.context import context_attention, context_mean, context_rank_size, gather_context
from megatrain.parallel.cross_entropy import masked_mean, vocab_parallel_cross_entropy
from megatrain.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                       init_tp_param, tp_info)
from megatrain.parallel.mappings import copy_to_tp, gather_from_tp, gather_seq
from megatrain.parallel.random import RNGTracker


# --------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * w, computed in fp32 (bf16 squares lose the small components).

    ``sp_group``: under sequence parallelism each TP rank normalises other tokens, so the weight's
    gradient is the sum over the group (``copy_to_tp``: identity forward, all-reduce backward)."""

    def __init__(self, dim: int, eps: float, device: Optional[torch.device] = None, sp_group: Any = None):
        super().__init__()
        self.eps, self.sp_group = eps, sp_group
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def scale(self) -> torch.Tensor:
        return self.weight if self.sp_group is None else copy_to_tp(self.weight, self.sp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.scale(), self.eps)

    def reset_parameters(self, seed: int, key: str) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """theta^(-2i/D) for i < D/2, with Llama-3.1 frequency-dependent scaling when configured."""
    d = cfg.head_dim
    # on the CPU explicitly: models are built under `with torch.device("cuda")`, tables are moved once
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq.float()
    # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and the band in
    # between interpolated, so local patterns keep their resolution while the context stretches.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    return torch.where(mid, blended, scaled).float()


class Rotary:
    """cos/sin tables, cached per (length, device). Not a buffer: DeepSpeed's ``module.bfloat16()``
    would round a buffer to bf16, and RoPE angles at position 8K need fp32. Nothing is computed when
    the model is built: under ``deepspeed.zero.Init`` (ZeRO-3) every floating tensor made then, even
    a float64 one on the CPU, is cast to the training dtype."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (t, str(device))
        if key not in self._cache:
            pos = torch.arange(t, dtype=torch.float32, device="cpu")
            freqs = torch.outer(pos, rope_inv_freq(self.cfg))  # (T, D/2)
            emb = torch.cat([freqs, freqs], dim=-1)  # (T, D): "rotate half" layout, as Hugging Face Llama
            self._cache[key] = (emb.cos().to(device), emb.sin().to(device))
        return self._cache[key]


@dataclass
class Ctx:
    """What every part needs besides its config: the TP and context groups, the RNG tracker, kernels
    and device. ``sequence_parallel`` (needs a TP group) splits the residual stream over TP ranks."""

    tp_group: Any = None
    rng: Optional[RNGTracker] = None
    device: Optional[torch.device] = None
    dtype: Optional[torch.dtype] = None
    loss_chunk_tokens: int = 0
    sequence_parallel: bool = False
    cp_group: Any = None
    document_positions: bool = True  # with position_ids: RoPE restarts per document (else 0..T-1)

    @property
    def sp_group(self) -> Any:
        """The group the sequence is split over between TP regions (None without SP)."""
        return self.tp_group if self.sequence_parallel else None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: Ctx):
        super().__init__()
        _, tp = tp_info(ctx.tp_group)
        self.head_dim = cfg.head_dim
        self.q_per_kv = cfg.num_heads // cfg.kv_heads
        self.kv_local = cfg.kv_heads // tp
        self.dropout = cfg.dropout
        self.rng = ctx.rng
        self.cp_group = ctx.cp_group
        self.document_positions = ctx.document_positions
        self.rotary = Rotary(cfg)
        # One GEMM for Q, K and V, grouped by KV head so that a TP split takes whole groups:
        # canonical weight (kv_heads, q_per_kv + 2, D, C) = per group [q_0 .. q_{r-1}, k, v].
        self.qkv = ColumnParallelLinear(cfg.hidden_size, (cfg.kv_heads, self.q_per_kv + 2, cfg.head_dim),
                                        tp_group=ctx.tp_group, split_dim=0, device=ctx.device,
                                        sequence_parallel=ctx.sequence_parallel)
        self.o = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, tp_group=ctx.tp_group,
                                   device=ctx.device, sequence_parallel=ctx.sequence_parallel)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Any = None) -> torch.Tensor:
        # (B, H|K, T, D) each; with ``docs`` (a DocumentLayout of the whole sequence) block-causal
        p = self.dropout if self.training else 0.0
        if p > 0 and self.rng is not None:
            with self.rng.fork():  # heads are split over TP ranks: each rank drops its own pattern
                return kernels.attention(q, k, v, p, docs)
        return kernels.attention(q, k, v, p, docs)

    def forward(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x (B, T or T/tp with SP, C); position_ids (B, T cp): every token's position in its document,
        # for the whole sequence on every context rank
        qkv = self.qkv(x)  # (B, T, K (r+2) D): gathered over TP under sequence parallelism
        b, t = qkv.shape[:2]
        qkv = qkv.view(b, t, self.kv_local, self.q_per_kv + 2, self.head_dim)  # (B, T, K, r+2, D)
        cp_rank, cp = context_rank_size(self.cp_group)
        docs = None if position_ids is None else layout_for(position_ids)  # built once per micro-batch
        if docs is not None and self.document_positions:
            cos, sin = docs.rope_tables(self.rotary, cp_rank * t, t)  # (B, T, D): restarting per document
        else:
            cos, sin = self.rotary.tables(t * cp, x.device)  # (T cp, D): the whole sequence's positions
            cos, sin = cos[cp_rank * t:(cp_rank + 1) * t], sin[cp_rank * t:(cp_rank + 1) * t]  # this slice's
        # q (B, T, H, D) with head h using KV h // r; k, v (B, T, K, D); q and k rotated
        q, k, v = kernels.split_qkv_rope(qkv, cos, sin)
        y = context_attention(q, k, v, self.cp_group, functools.partial(self._attend, docs=docs))  # (B, T, H, D)
        return self.o(y.reshape(b, t, -1))  # (B, T, H*D) -> (B, T, C) (T/tp with SP)


class MLP(nn.Module):
    """SwiGLU: down(silu(x W_gate) * (x W_up)); gate and up fused in one column-parallel GEMM."""

    def __init__(self, cfg: ModelConfig, ctx: Ctx):
        super().__init__()
        sp = ctx.sequence_parallel
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, (2, cfg.ffn_size), tp_group=ctx.tp_group,
                                            split_dim=1, device=ctx.device, sequence_parallel=sp)
        self.down = RowParallelLinear(cfg.ffn_size, cfg.hidden_size, tp_group=ctx.tp_group, device=ctx.device,
                                      sequence_parallel=sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up(x)  # (B, T, 2F): [gate | up]
        return self.down(kernels.swiglu(gu))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, ctx: Ctx, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.std = cfg.init_std
        self.out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.dropout = cfg.dropout
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, ctx.device, ctx.sp_group)
        self.attn = Attention(cfg, ctx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, ctx.device, ctx.sp_group)
        self.mlp = MLP(cfg, ctx)

    def forward(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        # (B, T, C) -> (B, T, C); position_ids (B, T) makes attention document-aware.
        # Recomputation and compile wrap this from outside (megatrain.parallelize).
        a = F.dropout(self.attn(self.attn_norm(x), position_ids), self.dropout, self.training)
        x, h = kernels.add_rms_norm(x, a, self.mlp_norm.scale(), self.mlp_norm.eps)  # x + a, and its norm
        return x + F.dropout(self.mlp(h), self.dropout, self.training)

    def reset_parameters(self, seed: int, key: str) -> None:
        init_tp_param(self.attn.qkv.weight, self.std, f"{key}.attn.qkv", seed)
        init_tp_param(self.attn.o.weight, self.out_std, f"{key}.attn.o", seed)
        init_tp_param(self.mlp.gate_up.weight, self.std, f"{key}.mlp.gate_up", seed)
        init_tp_param(self.mlp.down.weight, self.out_std, f"{key}.mlp.down", seed)
        self.attn_norm.reset_parameters(seed, key)
        self.mlp_norm.reset_parameters(seed, key)


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: Ctx):
        super().__init__()
        self.std = cfg.init_std
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_group=ctx.tp_group,
                                            device=ctx.device, sequence_parallel=ctx.sequence_parallel)

    @property
    def weight(self) -> nn.Parameter:  # what TiedLayerSpec ties
        return self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C) (T/tp with SP)
        return self.embed(tokens)

    def reset_parameters(self, seed: int, key: str) -> None:
        init_tp_param(self.embed.weight, self.std, "embed", seed)


class FinalNorm(RMSNorm):
    def __init__(self, cfg: ModelConfig, ctx: Ctx):
        super().__init__(cfg.hidden_size, cfg.norm_eps, ctx.device, ctx.sp_group)


class Head(nn.Module):
    """Output projection to this rank's slice of the vocabulary (weight (V/p, C), split on dim 0)."""

    def __init__(self, cfg: ModelConfig, ctx: Ctx):
        super().__init__()
        self.std = cfg.init_std
        self.proj = ColumnParallelLinear(cfg.hidden_size, cfg.vocab_size, tp_group=ctx.tp_group, device=ctx.device,
                                         sequence_parallel=ctx.sequence_parallel)

    @property
    def weight(self) -> nn.Parameter:
        return self.proj.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, V/p)
        return self.proj(h)

    def reset_parameters(self, seed: int, key: str) -> None:
        init_tp_param(self.proj.weight, self.std, "head", seed)


def _into_head(h: torch.Tensor, tp_group: Any, sequence_parallel: bool) -> torch.Tensor:
    """The head's input in the TP region: this rank's T/tp tokens all-gathered under sequence
    parallelism (every TP rank needs every token for its slice of the vocabulary), else replicated."""
    return gather_seq(h, tp_group) if sequence_parallel else copy_to_tp(h, tp_group)


def head_logits(weight: torch.Tensor, h: torch.Tensor, tp_group: Any, sequence_parallel: bool = False) -> torch.Tensor:
    """Local vocab-parallel logits (B, T, V/p) from hidden states (B, T, C) (T/tp with SP) and a (V/p, C) weight."""
    return F.linear(_into_head(h, tp_group, sequence_parallel), weight)


def head_loss(weight: torch.Tensor, h: torch.Tensor, labels: torch.Tensor, ctx: Ctx) -> torch.Tensor:
    """Mean cross-entropy of the head's logits over the whole sequence (all context ranks), chunked so
    full fp32 logits never exist. ``labels`` (B, T) are this context rank's, whole over TP."""
    local = kernels.linear_cross_entropy(_into_head(h, ctx.tp_group, ctx.sequence_parallel), weight, labels,
                                         ctx.tp_group, ctx.loss_chunk_tokens)
    return context_mean(local, labels, ctx.cp_group)


def logits_loss(logits: torch.Tensor, labels: torch.Tensor, tp_group: Any, cp_group: Any = None) -> torch.Tensor:
    """Mean cross-entropy from local vocab-parallel logits (the pipeline's loss_fn)."""
    local = masked_mean(vocab_parallel_cross_entropy(logits, labels, tp_group), labels)
    return context_mean(local, labels, cp_group)


# --------------------------------------------------------------------------- the model


@dataclass
class Part:
    """One entry of the flat layer list: ``cls(cfg, ctx, *args)``; ``tie`` names a shared weight."""

    name: str
    cls: type
    args: tuple = ()
    tie: Optional[str] = None


class PipeEmbedding(Embedding):
    """The embedding as a pipeline stage's first layer: tokens -> x, or (tokens, position_ids) ->
    (x, position_ids), so the document layout travels between stages with the hidden states."""

    def forward(self, inputs):  # type: ignore[override]
        if isinstance(inputs, tuple):
            tokens, position_ids = inputs
            return super().forward(tokens), position_ids
        return super().forward(inputs)


class PipeBlock(Block):
    """A block in the pipeline: x -> x, or (x, position_ids) -> (x, position_ids)."""

    def forward(self, inputs):  # type: ignore[override]
        if isinstance(inputs, tuple):
            x, position_ids = inputs
            return super().forward(x, position_ids), position_ids
        return super().forward(inputs)


class PipeFinalNorm(FinalNorm):
    """The final norm in the pipeline; drops the document layout (the head needs none)."""

    def forward(self, inputs):  # type: ignore[override]
        return super().forward(inputs[0] if isinstance(inputs, tuple) else inputs)


def layer_parts(cfg: ModelConfig) -> list[Part]:
    """The model as a flat list, in order: what PipelineModule partitions into stages. The pipeline
    variants of the classes take and pass on the (hidden, position_ids) tuple; parameters and names
    are those of the plain classes."""
    parts = [Part("embed", PipeEmbedding, tie="embed" if cfg.tie_embeddings else None)]
    parts += [Part(f"block{i}", PipeBlock, (i,)) for i in range(cfg.num_layers)]
    parts.append(Part("norm", PipeFinalNorm))
    parts.append(Part("head", PipeEmbedding if cfg.tie_embeddings else Head,
                      tie="embed" if cfg.tie_embeddings else None))
    return parts


class LlamaModel(nn.Module):
    """The whole model in one process group slice (TP only; PP goes through the engine)."""

    def __init__(self, cfg: ModelConfig, ctx: Optional[Ctx] = None):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx or Ctx()
        self.embed = Embedding(cfg, self.ctx)
        self.blocks = nn.ModuleList(Block(cfg, self.ctx, i) for i in range(cfg.num_layers))
        self.norm = FinalNorm(cfg, self.ctx)
        self.head = None if cfg.tie_embeddings else Head(cfg, self.ctx)

    @property
    def head_weight(self) -> nn.Parameter:
        return self.embed.weight if self.head is None else self.head.weight

    def init_parts(self) -> list[tuple[str, nn.Module]]:
        """(key, module) for every part with its own ``reset_parameters(seed, key)``, in model order."""
        parts = [("embed", self.embed)] + [(f"block{blk.layer_idx}", blk) for blk in self.blocks]
        parts.append(("norm", self.norm))
        if self.head is not None:
            parts.append(("head", self.head))
        return parts

    def init_weights(self, seed: int) -> None:
        """Deterministic, topology-independent initialisation (see ``init_tp_param``)."""
        for key, part in self.init_parts():
            part.reset_parameters(seed, key)

    def hidden(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        # (B, T) -> (B, T, C), after the final norm; position_ids (B, T): document-aware attention
        x = self.embed(tokens)
        if position_ids is None:  # the plain causal path, exactly as without documents
            for blk in self.blocks:
                x = blk(x)
        else:
            for blk in self.blocks:
                x = blk(x, position_ids)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean loss over non-ignored labels when ``labels`` is given; otherwise full logits (B, T, V)
        (with context parallelism: ``tokens`` is this rank's slice and the logits cover the whole sequence).
        ``position_ids`` (B, T), from the loader under ``data.document_mask``, keeps attention and RoPE
        within each document of a packed sample (the whole sequence's, on every context rank)."""
        h = self.hidden(tokens, position_ids)
        if labels is not None:
            return head_loss(self.head_weight, h, labels, self.ctx)
        c = self.ctx
        logits = gather_from_tp(head_logits(self.head_weight, h, c.tp_group, c.sequence_parallel), c.tp_group)
        return gather_context(logits, c.cp_group)


def build_model(cfg: ModelConfig, *, tp_group: Any = None, device: Any = None, seed: Optional[int] = None,
                loss_chunk_tokens: int = 0, sequence_parallel: bool = False, cp_group: Any = None,
                document_positions: bool = True) -> LlamaModel:
    """Build (and, given a seed, initialise) the TP-sharded model on ``device``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    tp_rank, tp_size = tp_info(tp_group)
    if sequence_parallel and tp_size < 2:
        from megatrain.config import ConfigError

        raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor >= 2")
    rng = RNGTracker(device)
    ctx = Ctx(tp_group=tp_group, rng=rng, device=device, loss_chunk_tokens=loss_chunk_tokens,
              sequence_parallel=sequence_parallel, cp_group=cp_group, document_positions=document_positions)
    model = LlamaModel(cfg, ctx)
    if seed is not None:
        model.init_weights(seed)
        rng.seed(seed, tp_rank)
    return model
