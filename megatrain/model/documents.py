"""Packed samples that respect documents: the layout of a micro-batch and block-causal attention.

A sample is ``seq_len`` tokens cut from a stream of documents. With ``data.document_mask`` the loader
sends, next to the tokens, ``position_ids`` (B, T) int64: each token's position in its document, 0
where a document begins (the sample's first token always begins one). That one tensor is the whole
layout: the documents are the runs between zeros. It travels with the hidden states (through every
block, and between pipeline stages as the second element of the activation tuple), and every block
of a stage reuses the structures built from it (:func:`layout_for` caches them per tensor).

Query i attends to key j iff j <= i and both lie in the same document (block-causal). Kernels:

- ``sdpa``: ``scaled_dot_product_attention`` with an explicit (B, 1, T, T) boolean mask. The
  reference and the CPU path; supports dropout; O(T^2) memory for the mask, no skipped work.
- ``flex``: ``flex_attention`` (compiled) with a document ``BlockMask``: 128 x 128 tiles entirely
  across documents are skipped, so the masked step does less work than the causal one.
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash) over the packed batch as one
  sequence of B T tokens with cumulative document lengths; FA4 is activated where
  ``torch.nn.attention.activate_flash_attention_impl("FA4")`` can load it. One host sync per layout
  (the longest document). Needs bf16/fp16 on a GPU.

Context parallelism (Ulysses): each rank holds T/cp tokens of the hidden states for all heads, and,
after the all-to-all, all T tokens for H/cp heads. ``position_ids`` is always the global (B, T)
tensor on every context rank (all of them read the same samples), so attention after the all-to-all
takes the layout as it is, while RoPE, applied before it to the rank's own tokens, takes their slice
(:meth:`DocumentLayout.rope_tables` with ``start``/``length``). Sequence parallelism inside the TP
group needs nothing: attention runs on the gathered sequence.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

log = logging.getLogger(__name__)

BACKENDS = ("auto", "flex", "varlen", "sdpa")
_backend = "sdpa"  # what configure() chose for this process
_warned: set = set()


# --------------------------------------------------------------------------- the layout


class DocumentLayout:
    """The document structure of one micro-batch, and the kernel inputs derived from it (built once)."""

    def __init__(self, position_ids: torch.Tensor, *, weak: bool = False):
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be (batch, seq), got shape {tuple(position_ids.shape)}")
        # (B, T) int64, 0 where a document begins. Held weakly when cached under the tensor itself
        # (layout_for), so that a micro-batch's masks are freed with its position ids.
        self._strong = None if weak else position_ids
        self._ref = weakref.ref(position_ids)
        self._built: dict[Any, Any] = {}

    @property
    def position_ids(self) -> torch.Tensor:
        p = self._ref()
        if p is None:
            raise RuntimeError("the position_ids this document layout was made from no longer exist")
        return p

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.position_ids.shape)  # type: ignore[return-value]

    def _once(self, key: Any, build: Callable[[], Any]) -> Any:
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]

    def document_ids(self) -> torch.Tensor:
        """(B, T) int32: index of each token's document within its sample (0, 1, ...)."""
        def build() -> torch.Tensor:
            starts = (self.position_ids == 0).to(torch.int32)
            starts[:, 0] = 1  # a sample always begins a document, whatever its first position says
            return torch.cumsum(starts, dim=1, dtype=torch.int32) - 1
        return self._once("doc", build)

    def dense_mask(self) -> torch.Tensor:
        """(B, 1, T, T) bool, True where query i may attend to key j."""
        def build() -> torch.Tensor:
            doc = self.document_ids()
            t = doc.shape[1]
            causal = torch.ones(t, t, dtype=torch.bool, device=doc.device).tril()
            return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]
        return self._once("dense", build)

    def block_mask(self) -> Any:
        """flex_attention's BlockMask of the block-causal pattern (built on the layout's device)."""
        def build() -> Any:
            from torch.nn.attention.flex_attention import create_block_mask

            doc = self.document_ids()
            b, t = doc.shape

            def same_document_causal(bi, h, qi, ki):  # noqa: ARG001 - flex's mask_mod signature
                return (doc[bi, qi] == doc[bi, ki]) & (qi >= ki)

            return create_block_mask(same_document_causal, b, None, t, t, device=doc.device, _compile=doc.is_cuda)
        return self._once("block", build)

    def cu_seqlens(self) -> tuple[torch.Tensor, int]:
        """(cu (N+1,) int32, longest document) over the batch flattened to one sequence of B T tokens."""
        def build() -> tuple[torch.Tensor, int]:
            begins = self.position_ids == 0
            begins[:, 0] = True  # every sample begins a document: none spans two samples
            flat = begins.reshape(-1)
            starts = torch.nonzero(flat).reshape(-1).to(torch.int32)  # host sync: the count is data
            end = torch.full((1,), flat.numel(), dtype=torch.int32, device=flat.device)
            cu = torch.cat([starts, end])
            return cu, int((cu[1:] - cu[:-1]).max().item())
        return self._once("cu", build)

    def rope_tables(self, rotary: Any, start: int = 0, length: Optional[int] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, length, D) fp32 at the document positions of tokens [start, start + length)
        (a context-parallel rank's own tokens; default: all)."""
        t = self.position_ids.shape[1]
        length = t - start if length is None else length

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            cos, sin = rotary.tables(t, self.position_ids.device)  # (T, D): positions are < T
            pos = self.position_ids[:, start:start + length]
            return cos[pos], sin[pos]
        return self._once(("rope", id(rotary.cfg), start, length), build)


_layouts = WeakTensorKeyDictionary()  # position_ids -> its layout, for as long as the tensor lives


def layout_for(position_ids: torch.Tensor) -> DocumentLayout:
    """The layout of this very tensor: every block of a stage (and its recomputation) gets the same
    object, so masks and tables are built once per micro-batch, not once per layer."""
    layout = _layouts.get(position_ids)
    if layout is None:
        layout = _layouts[position_ids] = DocumentLayout(position_ids, weak=True)
    return layout


# --------------------------------------------------------------------------- kernels


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """The reference: SDPA with the explicit block-causal mask. q (B, H, T, D), k/v (B, K, T, D)."""
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense_mask(), dropout_p=dropout_p,
                                          enable_gqa=gqa)


_flex_compiled: Optional[Callable] = None


def attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout) -> torch.Tensor:
    """flex_attention with the document block mask; compiled once per process (eager flex is a slow
    reference), or traced as it is when the block itself is being compiled."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():
        if _flex_compiled is None:
            _flex_compiled = torch.compile(flex_attention, dynamic=False)
        fn = _flex_compiled
    return fn(q, k, v, block_mask=layout.block_mask(), enable_gqa=q.shape[1] != k.shape[1])


def _varlen_kernel(q, k, v, cu, max_len, gqa):  # (N, H, D) each
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0), enable_gqa=gqa)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout,
                     kernel: Callable = _varlen_kernel) -> torch.Tensor:
    """Causal varlen attention over the batch packed as one sequence cut at every document start.
    q (B, H, T, D) is a transposed view of (B, T, H, D), so the packing is a view, not a copy."""
    b, h, t, d = q.shape
    cu, max_len = layout.cu_seqlens()
    qp = q.transpose(1, 2).reshape(b * t, h, d)  # (B T, H, D)
    kp = k.transpose(1, 2).reshape(b * t, k.shape[1], d)
    vp = v.transpose(1, 2).reshape(b * t, v.shape[1], d)
    y = kernel(qp, kp, vp, cu, max_len, h != k.shape[1])  # (B T, H, D)
    return y.view(b, t, h, d).transpose(1, 2)  # (B, H, T, D), as SDPA returns it


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout,
              dropout_p: float = 0.0) -> torch.Tensor:
    """Block-causal attention with the kernel :func:`configure` chose; q (B, H, T, D), k/v (B, K, T, D)."""
    backend = _backend
    if backend != "sdpa" and (dropout_p > 0 or not q.is_cuda):
        backend = _fallback(backend, "attention dropout" if dropout_p > 0 else "CPU tensors")
    elif backend == "varlen" and q.dtype not in (torch.float16, torch.bfloat16):
        backend = _fallback(backend, f"{q.dtype} (flash varlen needs bf16 or fp16)")
    if backend == "flex":
        return attention_flex(q, k, v, layout)
    if backend == "varlen":
        return attention_varlen(q, k, v, layout)
    return attention_sdpa(q, k, v, layout, dropout_p)


def _fallback(backend: str, why: str) -> str:
    if (backend, why) not in _warned:
        _warned.add((backend, why))
        log.warning("document attention: %s cannot run with %s; using sdpa with an explicit mask", backend, why)
    return "sdpa"


# --------------------------------------------------------------------------- selection


def flex_available() -> bool:
    """flex_attention compiles through Triton on the GPU."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _activate_fa4() -> bool:
    """Route flash attention (varlen included) to FA4 where its package loads; False otherwise."""
    try:
        from torch.nn.attention import activate_flash_attention_impl, list_flash_attention_impls

        if "FA4" not in list_flash_attention_impls():
            return False
        activate_flash_attention_impl("FA4")
    except Exception as e:  # noqa: BLE001 - FA4 is optional: a missing flash_attn.cute just keeps FA2
        log.debug("FA4 not activated: %s", e)
        return False
    return True


def configure(choice: str = "auto") -> str:
    """Select the document-attention kernel for this process; returns a description for the start log."""
    global _backend
    if choice not in BACKENDS:
        raise ValueError(f"document attention {choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "auto":
        choice = "flex" if flex_available() else "varlen" if varlen_available() else "sdpa"
    if choice == "flex" and not flex_available():
        log.warning("train.document_attention=flex needs a GPU and Triton: using sdpa with an explicit mask")
        choice = "sdpa"
    if choice == "varlen" and not varlen_available():
        log.warning("train.document_attention=varlen needs a GPU: using sdpa with an explicit mask")
        choice = "sdpa"
    _backend = choice
    if choice == "varlen":
        return "varlen (FA4)" if _activate_fa4() else "varlen (flash)"
    return {"flex": "flex_attention with a document block mask", "sdpa": "SDPA with an explicit mask"}[choice]
