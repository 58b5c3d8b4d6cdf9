"""Greedy and nucleus (top-p) decoding for text samples during training and conversion checks.

No KV cache: each new token re-runs the prefix. That is fine for the short samples a
training run logs and keeps the model free of inference-only state.
"""

from __future__ import annotations

from typing import Optional

import torch


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, max_len: int,
             device: torch.device, top_p: float = 0.0, temperature: float = 1.0, seed: int = 0,
             eos_id: Optional[int] = None, vocab_limit: Optional[int] = None) -> list[int]:
    """New token ids after ``prompt_ids``; greedy when ``top_p`` is 0.

    ``vocab_limit``: ids at or above it are never drawn. A model's vocabulary is often padded past its
    tokenizer's (to a multiple of 64 or of the TP size); those rows are untrained, and an id there has no
    piece to decode.

    The random draws use a generator seeded identically on every rank, and the logits are
    identical across ranks, so all ranks pick the same tokens and stay in lockstep."""
    ids = torch.tensor([prompt_ids or [0]], dtype=torch.long, device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids[:, -max_len:])[0, -1].float().cpu()  # (V,)
        if vocab_limit is not None and vocab_limit < logits.numel():
            logits[vocab_limit:] = float("-inf")
        nxt = _pick(logits, top_p, temperature, gen)
        out.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return out


def _pick(logits: torch.Tensor, top_p: float, temperature: float, gen: torch.Generator) -> int:
    if top_p <= 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p  # smallest prefix whose mass reaches top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
    return int(order[choice])
