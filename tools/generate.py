#!/usr/bin/env python3
"""megatrain-generate: text from a checkpoint, printed as it is generated.

    megatrain-generate runs/demo --prompt "def " --prompt "The " --max-tokens 64
    megatrain-generate runs/demo/checkpoints/step_00000200 --prompt-file prompts.txt --greedy
    megatrain-generate out/tinyllama-hf --prompt "Once upon a time" --temperature 0.7 --top-p 0.9
    torchrun --nproc-per-node 2 tools/generate.py runs/demo --prompt "The "   # tensor-parallel over 2 ranks

PATH is a run directory (its newest complete checkpoint, the one training would resume from), a
checkpoint directory (RUN/checkpoints/step_N) or a Hugging Face Llama directory. Sampling:
--greedy, or --temperature T with --top-p P (nucleus). Ids past the tokenizer's vocabulary (a
model.vocab_size padded for TP) are never drawn. The text goes to stdout; progress and the
summary go to stderr.

Exit status: 0 done, 2 bad input or arguments (the message says what to do).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megatrain.telemetry.console import pipe_safe  # noqa: E402

log = logging.getLogger("megatrain.generate")


def build_parser() -> argparse.ArgumentParser:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(prog="megatrain-generate", description=head, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run directory, checkpoint directory (step_N) or Hugging Face Llama directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompt-file", help="a file of prompts, one per line ('-': standard input)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    p.add_argument("--greedy", action="store_true", help="always the most likely token")
    p.add_argument("--temperature", type=float, default=0.8, help="divide the logits by this (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="draw from the most likely tokens that make up this probability (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the draws")
    p.add_argument("--tokenizer", help="sentencepiece .model (default: the one found with the checkpoint)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="weight dtype (default fp32)")
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens of context the model sees (default: model.max_seq_len)")
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    from megatrain.config import ConfigError

    prompts = list(args.prompt)
    if args.prompt_file:
        if args.prompt_file == "-":
            text = sys.stdin.read()
        else:
            try:
                text = Path(args.prompt_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"--prompt-file {args.prompt_file}: cannot read it ({e})") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompt: give --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def check_args(args: argparse.Namespace) -> None:
    from megatrain.config import ConfigError

    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens {args.max_tokens}: must be >= 1")
    if not (args.temperature >= 0) or not (0 < args.top_p <= 1):  # also refuses nan
        raise ConfigError(f"--temperature {args.temperature} --top-p {args.top_p}: need temperature >= 0 and "
                          f"0 < top_p <= 1 (or --greedy)")
    if args.max_context is not None and args.max_context < 1:
        raise ConfigError(f"--max-context {args.max_context}: must be >= 1")


def start_ranks(device_type: str):
    """ParallelState for this process: TP over every rank of a torchrun/Slurm/MPI launch, else one rank."""
    from megatrain.parallel.state import ParallelState

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and "SLURM_PROCID" not in os.environ:
        return ParallelState.single()
    import torch.distributed as dist

    from megatrain.config import DistributedConfig
    from megatrain.launch.rendezvous import init_distributed

    if not dist.is_initialized():
        init_distributed(DistributedConfig(), device_type)
    world = dist.get_world_size()
    return ParallelState.build(world, 1) if world > 1 else ParallelState.single()


def load_model(args: argparse.Namespace, st, device):
    """(model on ``device`` with this rank's TP slices, tokenizer, model config)."""
    import torch

    from megatrain.config import ConfigError
    from megatrain.convert.source import load_source_for_rank, load_tokenizer
    from megatrain.model import build_model

    src = load_source_for_rank(args.path, st.tp_rank, st.tp_size, args.tokenizer)
    m = src.model
    for what, n in (("attention heads", m.num_heads), ("KV heads", m.kv_heads), ("FFN width", m.ffn_size),
                    ("vocabulary rows", m.vocab_size)):
        if n % st.tp_size:
            raise ConfigError(f"{args.path}: {n} {what} do not split over {st.tp_size} ranks; use a number of "
                              f"processes that divides {n}")
    if src.tokenizer is None:
        raise ConfigError(f"{args.path}: no tokenizer found with the checkpoint; pass --tokenizer PATH")
    tok = load_tokenizer(src.tokenizer, m, allow_padded_vocab=True)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = build_model(m, tp_group=st.tp_group if st.tp_size > 1 else None, device="cpu")
    model.load_state_dict(src.weights, strict=True)
    return model.to(device=device, dtype=dtype).eval(), tok, m, src


def generate_all(args, model, tok, cfg, device, st) -> tuple[int, int]:
    """Stream each prompt's continuation to stdout (rank 0); returns (prompts, new tokens)."""
    from megatrain.model.generate import Sampling, TextStream, generate_rows, model_next_logits

    max_len = min(args.max_context or cfg.max_seq_len, cfg.max_seq_len)
    nxt = model_next_logits(model, max_len, device)
    s = Sampling(args.max_tokens, args.temperature, 0.0 if args.greedy else args.top_p, args.seed, tok.eos_id,
                 vocab_limit=tok.vocab_size)
    out, total = sys.stdout, 0
    for i, prompt in enumerate(read_prompts(args)):
        ids = tok.encode(prompt) or [tok.eos_id]  # an empty prompt starts a document
        stream = TextStream(tok.decode)
        if st.rank == 0:
            out.write(prompt)
            out.flush()

        def show(_row: int, token: int) -> None:
            if st.rank == 0 and token != tok.eos_id:
                out.write(stream.push(token))
                out.flush()

        s.seed = args.seed + i
        total += len(generate_rows(nxt, [ids], s, on_token=show)[0])
        if st.rank == 0:
            out.write(stream.flush() + "\n")
            out.flush()
    return i + 1, total


@pipe_safe
def main(argv: list[str] | None = None) -> int:
    import torch

    from megatrain.checkpoint import CheckpointError
    from megatrain.config import ConfigError
    from megatrain.convert.source import ConversionError
    from megatrain.launch.discover import LaunchError
    from megatrain.telemetry.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    logging.getLogger("megatrain").handlers[0].setStream(sys.stderr)  # stdout is for the text alone
    start = time.time()
    try:
        check_args(args)
        device_type = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) \
            else "cpu"
        st = start_ranks(device_type)
        device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
        model, tok, cfg, src = load_model(args, st, device)
        log.info("generating from %s (%s, TP %d) on %s", src.path, src.describe(), st.tp_size, device)
        n, tokens = generate_all(args, model, tok, cfg, device, st)
    except (ConfigError, ConversionError, CheckpointError, LaunchError, FileNotFoundError) as e:
        log.error("error: %s", e)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    secs = time.time() - start
    log.info("generated %d tokens for %d prompt(s) in %.1f s (%.1f tok/s, load included)", tokens, n, secs,
             tokens / max(secs, 1e-9))
    return 0


if __name__ == "__main__":
    sys.exit(main())
