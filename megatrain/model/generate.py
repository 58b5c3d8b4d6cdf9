"""Greedy, temperature and nucleus (top-p) decoding: text samples during training, conversion checks
and ``megatrain-generate``.

No KV cache: each new token re-runs the prefix. That is fine for the short samples a training run
logs and for a command-line check of a checkpoint, and keeps the model free of inference-only state.

The decoding loop only needs "logits of the next token for each row" (:data:`NextLogits`), so the
same loop drives a plain or tensor-parallel model (:func:`model_next_logits`) and a pipeline of
stages (``megatrain/samples.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

# rows of token ids -> (R, V) fp32 logits of the token after each row's last one
NextLogits = Callable[[list[list[int]]], torch.Tensor]


@dataclass
class Sampling:
    """How the next token is chosen. Greedy when ``top_p`` <= 0 or ``temperature`` <= 0."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 0.0
    seed: int = 0
    eos_id: Optional[int] = None
    # Ids >= vocab_limit are never drawn: model.vocab_size is often padded past the tokenizer (a
    # multiple of 64 x TP), and those rows have no text (SentencePiece cannot decode them).
    vocab_limit: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.top_p <= 0.0 or self.temperature <= 0.0


def model_next_logits(model: torch.nn.Module, max_len: int, device: Any) -> NextLogits:
    """NextLogits of a model that maps (B, T) ids to full (B, T, V) logits. Rows run one at a time
    (no padding, so any prompt length), each over its last ``max_len`` tokens."""

    def run(rows: list[list[int]]) -> torch.Tensor:
        out = []
        for row in rows:
            ids = torch.tensor([row[-max_len:]], dtype=torch.long, device=device)  # (1, T)
            out.append(model(ids)[0, -1].float().cpu())  # (V,)
        return torch.stack(out)  # (R, V)

    return run


@torch.no_grad()
def generate_rows(next_logits: NextLogits, prompts: list[list[int]], s: Sampling,
                  on_token: Optional[Callable[[int, int], None]] = None) -> list[list[int]]:
    """New token ids after each prompt. ``on_token(row, id)`` is called as each token is chosen.

    The random draws use one generator seeded identically on every rank, and the logits are
    identical across ranks, so all ranks pick the same tokens and stay in lockstep."""
    gen = torch.Generator(device="cpu").manual_seed(s.seed)
    rows = [list(p) or [0] for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    for _ in range(s.max_new_tokens):
        if not live:
            break
        logits = next_logits([rows[i] for i in live])  # (R, V)
        still = []
        for r, i in enumerate(live):
            nxt = pick(logits[r], s, gen)
            out[i].append(nxt)
            rows[i].append(nxt)
            if on_token is not None:
                on_token(i, nxt)
            if s.eos_id is None or nxt != s.eos_id:
                still.append(i)
        live = still
    return out


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, max_len: int,
             device: torch.device, top_p: float = 0.0, temperature: float = 1.0, seed: int = 0,
             eos_id: Optional[int] = None, vocab_limit: Optional[int] = None) -> list[int]:
    """New token ids after ``prompt_ids``; greedy when ``top_p`` is 0."""
    s = Sampling(max_new_tokens, temperature, top_p, seed, eos_id, vocab_limit)
    return generate_rows(model_next_logits(model, max_len, device), [prompt_ids], s)[0]


def pick(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
    """One id from (V,) logits: the arg-max, or a draw from the smallest set of most likely ids whose
    probability reaches ``top_p`` after dividing the logits by ``temperature``."""
    logits = logits.float()
    if s.vocab_limit is not None and s.vocab_limit < logits.numel():
        logits = logits[: s.vocab_limit]  # the padded rows past the tokenizer are never candidates
    if s.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits / s.temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < s.top_p  # smallest prefix whose mass reaches top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
    return int(order[choice])


class TextStream:
    """Text of a growing id sequence, handed out piece by piece as it becomes final.

    Decoding ids one at a time loses what the tokenizer joins across pieces (a leading space, a
    character split into byte pieces), so the whole sequence is decoded each time and only the new
    suffix is returned; a suffix ending in an incomplete character (U+FFFD) waits for the next id."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.shown = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new

    def flush(self) -> str:
        text = self.decode(self.ids)
        new = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown = text
        return new
