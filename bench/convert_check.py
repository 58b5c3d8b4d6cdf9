"""A megatrain checkpoint and its Hugging Face export, side by side on the GPU.

    python bench/convert_check.py CHECKPOINT HF_DIR

Loads the checkpoint into megatrain's model (one GPU, TP=1, whatever layout saved it) and the export
into transformers' LlamaForCausalLM, runs both on the same random token batch in fp32 and in bf16, and
prints one JSON line: max |logit difference|, the largest |logit| for scale, and how often the two
agree on the next token.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    from transformers import AutoModelForCausalLM

    from megatrain.convert.source import load_source
    from megatrain.model import build_model

    ckpt, hf_dir = sys.argv[1], sys.argv[2]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    src = load_source(ckpt, "megatrain", verify="full")
    ours = build_model(src.model, device=dev).eval()
    ours.load_state_dict({n: t.float() for n, t in src.weights.items()}, strict=True)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(dev).eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, src.model.vocab_size, (4, min(512, src.model.max_seq_len)), generator=gen).to(dev)
    out = {"checkpoint": src.describe(), "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "tokens": list(tokens.shape)}
    for dtype in (torch.float32, torch.bfloat16):
        ours.to(dtype)
        theirs.to(dtype)
        with torch.no_grad():
            a = ours(tokens).float()
            b = theirs(input_ids=tokens).logits.float()
        name = str(dtype).replace("torch.", "")
        out[name] = {"max_abs_diff": (a - b).abs().max().item(), "max_abs_logit": a.abs().max().item(),
                     "next_token_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
