"""Text samples from a training engine, plain or pipelined.

A plain (or tensor-parallel, or ZeRO) engine runs its module on each growing row. A pipeline has
no module to call: its stages only run inside the engine's schedule, so each decoding step is one
``eval_batch(..., compute_loss=False, return_logits=True)`` (DeepSpeed's public inference path)
over a micro-batch of the training shape (micro-batch x seq_len: the shape the engine's
communication buffers already have; rows right-padded, which causal attention never looks at).
The last stage gathers the vocabulary-parallel logits over its TP group and hands the next-token
logits to every stage through the pipeline group, so all ranks draw the same tokens.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from megatrain.engine import internals
from megatrain.model.generate import NextLogits, Sampling, generate_rows, model_next_logits
from megatrain.parallel.mappings import gather_from_tp

log = logging.getLogger(__name__)


def pipeline_next_logits(engine: Any, st: Any, micro_batch: int, seq_len: int, vocab: int,
                         device: torch.device) -> NextLogits:
    def run(rows: list[list[int]]) -> torch.Tensor:
        out = []
        for at in range(0, len(rows), micro_batch):
            chunk = [r[-seq_len:] for r in rows[at:at + micro_batch]]
            tokens = torch.zeros(micro_batch, seq_len, dtype=torch.long)  # (mb, T), right-padded
            for i, r in enumerate(chunk):
                tokens[i, :len(r)] = torch.tensor(r)
            internals.clear_pipeline_loss_total(engine)
            _, logits = engine.eval_batch(iter([(tokens, torch.zeros_like(tokens))]), return_logits=True,
                                          compute_loss=False, bcast_loss=False, num_micro_batches=1)
            internals.clear_pipeline_loss_total(engine)
            picked = torch.zeros(len(chunk), vocab, device=device)  # (R, V)
            if st.is_last_stage:
                full = gather_from_tp(logits, st.tp_group).float()  # (mb, T, V)
                last = torch.tensor([len(r) - 1 for r in chunk], device=full.device)
                picked = full[torch.arange(len(chunk), device=full.device), last].to(device)
            if st.pp_size > 1:  # from the last stage to every stage (the others hold zeros)
                dist.all_reduce(picked, group=st.pp_group)
            out.append(picked.cpu())
        return torch.cat(out)

    return run


def sample_texts(built: Any, st: Any, cfg: Any, tokenizer: Any, device: torch.device, seed: int) -> list[str]:
    """The configured prompts (``eval.prompts``), each continued by ``eval.sample_tokens`` tokens."""
    e = cfg.eval
    engine = built.engine
    if built.is_pipeline:
        nxt = pipeline_next_logits(engine, st, built.plan.micro_batch, cfg.train.seq_len, cfg.model.vocab_size,
                                   device)
    else:
        nxt = model_next_logits(engine.module, cfg.train.seq_len, device)
    s = Sampling(e.sample_tokens, e.temperature, e.top_p, seed, tokenizer.eos_id, vocab_limit=tokenizer.vocab_size)
    module = engine.module
    module.eval()
    try:
        new = generate_rows(nxt, [tokenizer.encode(p) for p in e.prompts], s)
    finally:
        module.train()
    return [p + tokenizer.decode(ids) for p, ids in zip(e.prompts, new)]
