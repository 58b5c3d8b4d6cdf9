"""GPU checks and micro-benchmarks behind docs/perf-notes.md (one command, prints a short report).

1. check: every fused kernel against its PyTorch reference on fresh random data,
   forward and gradients (fp32: relative error <= 1e-5; bf16: <= 2e-2).
2. attention: SDPA backends (flash, cuDNN, efficient) with grouped-query heads and with
   K/V expanded, forward + backward at both benchmark shapes.
3. elementwise: reference eager vs Triton vs torch.compile of the reference, forward + backward.
4. loss: head + cross-entropy at 16K tokens and vocabulary 128,256: time and peak extra memory
   for the chunked reference (fp32 logits) and the Triton path.
5. gemm: bf16 matmul rates for the model's GEMM shapes and 8192^3.

    python bench/micro.py --only check,attention
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def bench_ms(fn, rep: int = 30) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=rep, return_mode="median")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _grads(fn, inputs, dy_seed=0):
    xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator(device="cuda").manual_seed(dy_seed)
    loss = sum((o.float() * torch.randn(o.shape, device="cuda", generator=g)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs] + [x.grad for x in xs if x.grad is not None]


def check_kernels() -> list[str]:
    from megatrain.kernels import ops
    from megatrain.model import kernels as K

    lines = []
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x = torch.randn(3, 37, 2048, device="cuda", dtype=dt)
        w = (1 + 0.1 * torch.randn(2048, device="cuda")).to(dt)
        gu = torch.randn(3, 37, 2 * 704, device="cuda", dtype=dt)
        qkv = torch.randn(2, 50, 4, 10, 64, device="cuda", dtype=dt)  # (B, T, K, r+2, D): strided views like the model
        q, k = qkv[:, :, :, :8].reshape(2, 50, 32, 64), qkv[:, :, :, 8]
        ang = torch.rand(50, 32, device="cuda") * 50
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        cases = {"rms_norm": (ops.rms_norm, K.rms_norm_reference, (x, w), (1e-5,)),
                 "swiglu": (ops.swiglu, K.swiglu_reference, (gu,), ()),
                 "rope": (ops.apply_rope, K.apply_rope_reference, (q, k), (cos, sin)),
                 "qkv_rope": (ops.split_qkv_rope, K.split_qkv_rope, (qkv,), (cos, sin)),
                 "add_norm": (ops.add_rms_norm, lambda a, b, ww, e: (a + b, K.rms_norm_reference(a + b, ww, e)),
                              (x, x.flip(0), w), (1e-5,))}
        for name, (fast, ref, ins, extra) in cases.items():
            a = _grads(lambda *t: fast(*t, *extra), ins)
            b = _grads(lambda *t: ref(*t, *extra), [t.double() if dt == torch.float32 else t for t in ins])
            errs = [rel(u, v) for u, v in zip(a, b)]
            lines.append(f"check {name:9s} {str(dt)[6:]:8s} max rel err {max(errs):.2e} "
                         f"{'ok' if max(errs) <= tol else 'FAIL'}")
        lines.append(check_linear_ce(dt, tol))
    return lines


def check_linear_ce(dt, tol) -> str:
    from megatrain.kernels.linear_ce import linear_cross_entropy
    from megatrain.parallel.cross_entropy import fused_linear_cross_entropy

    h = torch.randn(1000, 256, device="cuda", dtype=dt)
    w = (torch.randn(5003, 256, device="cuda") * 0.05).to(dt)
    y = torch.randint(0, 5003, (1000,), device="cuda")
    y[::7] = -100
    a = _grads(lambda hh, ww: linear_cross_entropy(hh, ww, y, chunk_tokens=384), (h, w))
    b = _grads(lambda hh, ww: fused_linear_cross_entropy(hh, ww, y, chunk_tokens=384), (h, w))
    errs = [rel(u, v) for u, v in zip(a, b)]
    return f"check linear_ce  {str(dt)[6:]:8s} max rel err {max(errs):.2e} {'ok' if max(errs) <= tol else 'FAIL'}"


def attention_bench() -> list[str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lines = []
    for name, (b, t, h, kv) in {"tinyllama": (16, 2048, 32, 4), "llama3.2-1b": (4, 4096, 32, 8)}.items():
        # (B, T, H, D) storage transposed to (B, H, T, D), as the model passes them
        q = torch.randn(b, t, h, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        k = torch.randn(b, t, kv, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        v = torch.randn(b, t, kv, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        flops = 4 * b * h * t * t * 64 / 2 * 3.5  # causal half, backward 2.5x forward
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            for expand in (False, True):
                def run():
                    kk, vv = (k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1)) if expand else (k, v)
                    with sdpa_kernel([backend]):
                        o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=not expand)
                    o.backward(torch.ones_like(o))
                try:
                    ms = bench_ms(run)
                    msg = f"{ms:7.2f} ms fwd+bwd  {flops / ms / 1e9:5.0f} TFLOP/s (causal work)"
                except RuntimeError as e:
                    msg = "unsupported: " + str(e).splitlines()[0][:90]
                lines.append(f"attention {name:11s} {backend.name:19s} {'expand' if expand else 'gqa':6s} {msg}")
    return lines


def elementwise_bench() -> list[str]:
    from megatrain.kernels import ops
    from megatrain.model import kernels as K

    dt, lines = torch.bfloat16, []
    x = torch.randn(16, 2048, 2048, device="cuda", dtype=dt)
    w = torch.ones(2048, device="cuda", dtype=dt)
    gu = torch.randn(16, 2048, 2 * 5632, device="cuda", dtype=dt)
    qkv = torch.randn(16, 2048, 4, 10, 64, device="cuda", dtype=dt)
    q, k = qkv[:, :, :, :8].reshape(16, 2048, 32, 64), qkv[:, :, :, 8]
    ang = torch.rand(2048, 32, device="cuda") * 50
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    cases = {"rms_norm": (ops.rms_norm, K.rms_norm_reference, (x, w), (1e-5,)),
             "swiglu": (ops.swiglu, K.swiglu_reference, (gu,), ()),
             "rope": (ops.apply_rope, K.apply_rope_reference, (q, k), (cos, sin))}
    for name, (fast, ref, ins, extra) in cases.items():
        comp = torch.compile(ref)
        for label, fn in (("reference", ref), ("triton", fast), ("compiled", comp)):
            xs = [t.detach().clone().requires_grad_() for t in ins]

            def run():
                out = fn(*xs, *extra)
                outs = out if isinstance(out, tuple) else (out,)
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            lines.append(f"elementwise {name:9s} {label:9s} {bench_ms(run):7.3f} ms fwd+bwd (16x2048 tokens)")
    return lines


def loss_bench(tokens: int = 16384, vocab: int = 128256, hidden: int = 2048) -> list[str]:
    from megatrain.kernels.linear_ce import linear_cross_entropy
    from megatrain.parallel.cross_entropy import fused_linear_cross_entropy

    lines = []
    h0 = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w0 = (torch.randn(vocab, hidden, device="cuda") * 0.02).to(torch.bfloat16)
    y = torch.randint(0, vocab, (tokens,), device="cuda")
    variants = {"reference chunk=auto": lambda h, w: fused_linear_cross_entropy(h, w, y),
                "reference chunk=4096": lambda h, w: fused_linear_cross_entropy(h, w, y, chunk_tokens=4096),
                "triton chunk=auto": lambda h, w: linear_cross_entropy(h, w, y),
                "triton chunk=2048": lambda h, w: linear_cross_entropy(h, w, y, chunk_tokens=2048)}
    for name, fn in variants.items():
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()

        def run():
            fn(h, w).backward()
            h.grad = w.grad = None
        run()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**30
        wgrad = w0.numel() * 2 / 2**30
        lines.append(f"loss {name:22s} {bench_ms(run, rep=100):7.2f} ms fwd+bwd  peak extra {extra:.2f} GiB "
                     f"(of which the bf16 weight gradient {wgrad:.2f}) at {tokens} tokens, vocab {vocab}")
    return lines


def gemm_bench() -> list[str]:
    shapes = {"8192^3": (8192, 8192, 8192), "qkv 32K": (32768, 2560, 2048), "gate_up 32K": (32768, 11264, 2048),
              "down 32K": (32768, 2048, 5632), "o 32K": (32768, 2048, 2048), "wgrad gate_up": (11264, 2048, 32768),
              "head 4K x 128K": (4096, 128256, 2048)}
    lines = []
    for name, (m, n, k) in shapes.items():
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        ms = bench_ms(lambda: a @ b)
        lines.append(f"gemm {name:15s} {m}x{n}x{k}: {2 * m * n * k / ms / 1e9:5.0f} TFLOP/s")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="check,attention,elementwise,loss,gemm")
    a = p.parse_args(argv)
    sections = {"check": check_kernels, "attention": attention_bench, "elementwise": elementwise_bench,
                "loss": loss_bench, "gemm": gemm_bench}
    print(f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    for name in a.only.split(","):
        try:
            for line in sections[name]():
                print(line, flush=True)
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others' numbers
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
