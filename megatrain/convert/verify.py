"""Is the converted model the same model? Logits and greedy continuations, source vs. output.

Both sides run in fp32. When the output format rounds the weights (bf16, fp16, q8_0), the
reference is the source *with its weights rounded the same way*, so the check isolates the
conversion (names, layouts, permutations, shards) from the precision the user asked for; the
logit drift that rounding itself causes is reported separately.

A greedy mismatch at a step where the reference's top two logits are within the tolerance is a
tie, not an error (either token is a correct greedy choice at that precision).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from megatrain.config import ModelConfig

log = logging.getLogger(__name__)

Runner = Callable[[torch.Tensor], torch.Tensor]  # (B, T) token ids -> (B, T, V) fp32 logits

DEFAULT_PROMPTS = ("The meaning of life is", "Once upon a time, there was", "In the beginning",
                   "Training a language model requires", "def main():")


@dataclass
class VerifyResult:
    max_abs_diff: float
    tolerance: float
    greedy_agree: int
    greedy_ties: int
    num_prompts: int
    new_tokens: int
    rounding_drift: Optional[float] = None  # max |logit| change the output dtype itself causes
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.greedy_agree + self.greedy_ties == self.num_prompts

    def summary(self) -> str:
        s = (f"max|dlogit| {self.max_abs_diff:.2e} (tol {self.tolerance:.1e}), greedy {self.greedy_agree}"
             f"/{self.num_prompts} agree over {self.new_tokens} tokens")
        if self.greedy_ties:
            s += f" ({self.greedy_ties} more differ only at a tie)"
        if self.rounding_drift is not None:
            s += f", dtype rounding drift {self.rounding_drift:.2e}"
        return s + (": OK" if self.ok else ": FAILED")


# --------------------------------------------------------------------------- runners


def megatrain_runner(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> Runner:
    from megatrain.model import build_model

    model = build_model(cfg).eval()
    model.load_state_dict({n: t.float() for n, t in weights.items()}, strict=True)

    @torch.no_grad()
    def run(tokens: torch.Tensor) -> torch.Tensor:
        return model(tokens).float()

    return run


def hf_runner(path: Path) -> Runner:
    """transformers' own LlamaForCausalLM over an HF directory, in fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    @torch.no_grad()
    def run(tokens: torch.Tensor) -> torch.Tensor:
        return model(input_ids=tokens).logits.float()

    return run


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- inputs


def build_prompts(tok: Any, vocab_size: int, num_prompts: int = 5, seed: int = 0) -> torch.Tensor:
    """(P, L) prompt ids: the default prompts tokenized with BOS and cut to a common length, or random
    ids without a tokenizer."""
    if tok is not None:
        enc = [tok.encode(p, bos=True) for p in (DEFAULT_PROMPTS * num_prompts)[:num_prompts]]
        n = min(len(e) for e in enc)
        if n >= 2:
            return torch.tensor([e[:n] for e in enc], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_prompts, 8), generator=g)


def probe_tokens(vocab_size: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, length), generator=g)


@torch.no_grad()
def greedy(run: Runner, prompts: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Batched greedy continuation: (P, new_tokens) ids and each step's last-position logits."""
    ids, steps = prompts, []
    for _ in range(new_tokens):
        logits = run(ids)[:, -1]  # (P, V)
        steps.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompts.shape[1]:], steps


# --------------------------------------------------------------------------- the check


def compare(ref: Runner, got: Runner, prompts: torch.Tensor, probe: torch.Tensor, new_tokens: int,
            atol: float = 1e-4, rtol: float = 1e-5) -> VerifyResult:
    """Logits on ``probe`` and greedy continuations of ``prompts``, ``ref`` vs ``got``."""
    a, b = ref(probe), got(probe)
    if a.shape != b.shape:
        return VerifyResult(float("inf"), atol, 0, 0, len(prompts), new_tokens,
                            mismatches=[f"logit shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"])
    tol = atol + rtol * a.abs().max().item()
    diff = (a - b).abs().max().item()
    ids_a, steps_a = greedy(ref, prompts, new_tokens)
    ids_b, steps_b = greedy(got, prompts, new_tokens)
    for sa, sb in zip(steps_a, steps_b):
        diff = max(diff, (sa - sb).abs().max().item())
    agree, ties, notes = 0, 0, []
    for p in range(len(prompts)):
        differ = (ids_a[p] != ids_b[p]).nonzero()
        if len(differ) == 0:
            agree += 1
            continue
        j = int(differ[0])
        la = steps_a[j][p]
        margin = (la[ids_a[p, j]] - la[ids_b[p, j]]).abs().item()
        if margin <= tol:
            ties += 1
        else:
            notes.append(f"prompt {p}: continuations diverge at token {j} ({int(ids_a[p, j])} vs "
                         f"{int(ids_b[p, j])}, logit margin {margin:.2e})")
    return VerifyResult(diff, tol, agree, ties, len(prompts), new_tokens, mismatches=notes)


def rounding_drift(cfg: ModelConfig, exact: dict[str, torch.Tensor], rounded: dict[str, torch.Tensor],
                   probe: torch.Tensor) -> Optional[float]:
    """max |logit| change between the source weights and their rounded copy (None when identical)."""
    if all(torch.equal(exact[n].float(), rounded[n].float()) for n in exact):
        return None
    return (megatrain_runner(cfg, exact)(probe) - megatrain_runner(cfg, rounded)(probe)).abs().max().item()
