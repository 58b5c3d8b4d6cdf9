"""The fused and chunked kernel paths compute what the plain PyTorch references compute (fp32, <= 1e-5).

CI has no GPU and no Triton: the chunked head + loss runs here with the PyTorch
implementation of its two steps (statistics, in-place gradient), which exercises
the chunking, the in-place gradient and the TP=2 combination; the Triton kernels
themselves are checked against the same references by Triton's interpreter when
Triton is installed, and on the GPU by bench/micro.py (docs/perf-notes.md).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatrain.config import ConfigError, load_config
from megatrain.kernels.linear_ce import TORCH_OPS, auto_chunk_tokens, linear_cross_entropy
from megatrain.model import build_model, kernels
from megatrain.parallel import IGNORE_INDEX, copy_to_tp, fused_linear_cross_entropy, shard_of
from megatrain.launch.testing import run_distributed

TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def _problem(n=70, c=24, v=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g)
    w = torch.randn(v, c, generator=g) * 0.5
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = IGNORE_INDEX
    return h, w, y


def _loss_and_grads(fn, h, w, scale=1.0):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.fixture(autouse=True)
def _reset_kernels():
    yield
    kernels.configure_kernels("torch")


def test_chunked_loss_matches_full_logits_and_reference():
    h, w, y = _problem()
    full = _loss_and_grads(lambda a, b: F.cross_entropy(a @ b.t(), y, ignore_index=IGNORE_INDEX), h, w, 0.5)
    ref = _loss_and_grads(lambda a, b: fused_linear_cross_entropy(a, b, y, chunk_tokens=16), h, w, 0.5)
    # 70 tokens in chunks of 16: a ragged last chunk; a non-unit upstream gradient scales both gradients
    ours = _loss_and_grads(lambda a, b: linear_cross_entropy(a, b, y, chunk_tokens=16, ops=TORCH_OPS), h, w, 0.5)
    for name, x, r, f in zip(("loss", "grad_h", "grad_w"), ours, ref, full):
        assert _rel(x, f) <= TOL, f"{name} vs full logits: {_rel(x, f):.2e}"
        assert _rel(x, r) <= TOL, f"{name} vs chunked reference: {_rel(x, r):.2e}"


def test_all_ignored_is_zero_not_nan():
    h, w, _ = _problem(n=8)
    y = torch.full((8,), IGNORE_INDEX)
    loss, gh, gw = _loss_and_grads(lambda a, b: linear_cross_entropy(a, b, y, chunk_tokens=3, ops=TORCH_OPS), h, w)
    assert loss.item() == 0.0 and torch.all(gh == 0) and torch.all(gw == 0)


def _tp_worker() -> dict:
    group = dist.group.WORLD
    rank, size = dist.get_rank(), dist.get_world_size()
    h, w, y = _problem(n=45, v=302)  # 151 vocabulary rows per rank
    full = _loss_and_grads(lambda a, b: F.cross_entropy(a @ b.t(), y, ignore_index=IGNORE_INDEX), h, w, 0.5)
    w_local = shard_of(w, 0, rank, size)
    loss, gh, gw = _loss_and_grads(
        lambda a, b: linear_cross_entropy(copy_to_tp(a, group), b, y, group, chunk_tokens=8, ops=TORCH_OPS),
        h, w_local, 0.5)
    return {"loss": _rel(loss, full[0]), "grad_h": _rel(gh, full[1]),
            "grad_w": _rel(gw, shard_of(full[2], 0, rank, size))}


def test_vocab_parallel_tp2_matches_tp1():
    for rank, errs in enumerate(run_distributed(_tp_worker, 2)):
        for name, e in errs.items():
            assert e <= TOL, f"rank {rank}: {name} differs by {e:.2e}"


def test_auto_chunk_bounds_logits_memory():
    assert auto_chunk_tokens(128256, 2) == 1024  # 256 MiB of bf16 logits for Llama-3's vocabulary
    assert auto_chunk_tokens(32000, 2) == 4096
    assert auto_chunk_tokens(10**7, 4) == 128  # never below one GEMM tile
    assert auto_chunk_tokens(1000, 2) % 128 == 0


def test_configure_kernels_falls_back_on_cpu_and_rejects_unknown_modes():
    assert kernels.configure_kernels("triton") == ("triton" if kernels.triton_available() else "torch")
    with pytest.raises(ConfigError, match="train.fused_kernels"):
        kernels.configure_kernels("cuda")
    with pytest.raises(ValueError, match="attention"):
        kernels.configure_kernels("auto", attention="fastest")


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_model_loss_and_grads_do_not_depend_on_the_kernel_mode(mode):
    # On CPU "triton" resolves to the references: what must hold is that the dispatch (and the new
    # head + loss call site) computes exactly what the plain model computed.
    cfg = load_config(None, ["model.preset=debug"]).model
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    results = []
    for m in ("torch", mode):
        kernels.configure_kernels(m)
        model = build_model(cfg, seed=5, loss_chunk_tokens=16)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = results
    assert _rel(l1, l0) <= TOL and all(_rel(a, b) <= TOL for a, b in zip(g1, g0))


def test_selective_checkpointing_keeps_loss_and_gradients():
    from megatrain.parallelize import selective_checkpoint

    cfg = load_config(None, ["model.preset=debug"]).model
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    results = []
    for selective in (False, True):
        model = build_model(cfg, seed=5, loss_chunk_tokens=16)
        if selective:
            for blk in model.blocks:
                blk.forward = (lambda f: lambda x: selective_checkpoint(f, x))(blk.forward)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = results
    assert _rel(l1, l0) <= TOL and all(_rel(a, b) <= TOL for a, b in zip(g1, g0))


def test_expanded_kv_attention_equals_grouped_query():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, h, 9, 8, generator=g) for h in (4, 2, 2))
    grouped = kernels.attention(q, k, v)
    expanded = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert _rel(grouped, expanded) <= TOL


def test_apply_compile_shares_rope_tables_and_keeps_results():
    from megatrain.parallelize import apply_compile

    cfg = load_config(None, ["model.preset=debug"]).model
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    plain, compiled = build_model(cfg, seed=4), build_model(cfg, seed=4)
    assert apply_compile(compiled, seq_len=16, backend="eager") == cfg.num_layers
    assert len({id(b.attn.rotary) for b in compiled.blocks}) == 1
    with torch.no_grad():
        assert _rel(compiled(tokens), plain(tokens)) <= TOL


_INTERPRETED = textwrap.dedent("""
    import torch
    from megatrain.kernels import ops
    from megatrain.kernels.linear_ce import linear_cross_entropy, triton_ops
    from megatrain.model import kernels as K
    from megatrain.parallel.cross_entropy import fused_linear_cross_entropy

    def run(fn, ins, extra=()):
        xs = [x.clone().requires_grad_() for x in ins]
        out = fn(*xs, *extra)
        outs = out if isinstance(out, tuple) else (out,)
        g = torch.Generator().manual_seed(1)
        sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs).backward()
        return [o.detach() for o in outs] + [x.grad for x in xs]

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    torch.manual_seed(0)
    qkv = torch.randn(2, 6, 2, 4, 16)  # q/k as strided views of a fused QKV output, like the model
    q, k = qkv[:, :, :, :2].reshape(2, 6, 4, 16), qkv[:, :, :, 2]
    ang = torch.rand(6, 8) * 20
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    qkv5 = torch.randn(2, 5, 4, 10, 16)  # (B, T, K, r+2, D), r = 8

    def split_ref(x, c, s):  # slicing, then the reference rotation
        b, t, _, r2, d = x.shape
        qq, kk = K.apply_rope_reference(x[:, :, :, : r2 - 2].reshape(b, t, -1, d), x[:, :, :, r2 - 2], c, s)
        return qq, kk, x[:, :, :, r2 - 1]

    ang5 = torch.rand(5, 8) * 20
    cos5, sin5 = torch.cat([ang5, ang5], -1).cos(), torch.cat([ang5, ang5], -1).sin()
    pos6 = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 0, 1, 2, 3, 4]])
    pos5 = torch.tensor([[0, 1, 0, 1, 2], [0, 1, 2, 3, 0]])
    h, w, y = torch.randn(50, 32), torch.randn(500, 32) * 0.3, torch.randint(0, 500, (50,))
    y[::7] = -100
    cases = [(ops.rms_norm, K.rms_norm_reference, (torch.randn(2, 5, 96), 1 + torch.randn(96) / 10), (1e-5,)),
             (ops.swiglu, K.swiglu_reference, (torch.randn(2, 5, 80),), ()),
             (ops.apply_rope, K.apply_rope_reference, (q, k), (cos, sin)),
             (ops.split_qkv_rope, split_ref, (qkv5,), (cos5, sin5)),
             # per-sample tables (B, T, D): document positions (data.document_mask)
             (ops.apply_rope, K.apply_rope_reference, (q, k), (cos[pos6], sin[pos6])),
             (ops.split_qkv_rope, split_ref, (qkv5,), (cos5[pos5], sin5[pos5])),
             (lambda a, b, w: ops.add_rms_norm(a, b, w, 1e-5),
              lambda a, b, w: (a + b, K.rms_norm_reference(a + b, w, 1e-5)),
              (torch.randn(2, 5, 96), torch.randn(2, 5, 96), 1 + torch.randn(96) / 10), ()),
             (lambda a, b: linear_cross_entropy(a, b, y, chunk_tokens=16, ops=triton_ops()),
              lambda a, b: fused_linear_cross_entropy(a, b, y, chunk_tokens=16), (h, w), ())]
    worst = max(rel(a, b) for fast, ref, ins, extra in cases
                for a, b in zip(run(fast, ins, extra), run(ref, ins, extra)))

    # the CE kernels on two vocabulary shards (vocab_start 0 and 23), combined as _combine_tp does
    z, lab = torch.randn(9, 46), torch.tensor([0, 5, 22, 23, 30, 45, -100, 11, 40])
    ce = triton_ops()
    (m0, s0, t0), (m1, s1, t1) = ce.stats(z[:, :23].contiguous(), lab, 0), ce.stats(z[:, 23:].contiguous(), lab, 23)
    big = torch.maximum(m0, m1)
    lse = big + torch.log(s0 * torch.exp(m0 - big) + s1 * torch.exp(m1 - big))
    keep = lab != -100
    ref_t = z[torch.arange(9), lab.clamp(min=0)] * keep
    scale = torch.tensor([0.25])
    g0, g1 = z[:, :23].contiguous(), z[:, 23:].contiguous()
    ce.grad_(g0, lab, lse, scale, 0)
    ce.grad_(g1, lab, lse, scale, 23)
    ref_g = (torch.softmax(z, -1) - torch.nn.functional.one_hot(lab.clamp(min=0), 46)) * 0.25 * keep[:, None]
    worst = max(worst, rel(lse, torch.logsumexp(z, -1)), rel(t0 + t1, ref_t), rel(torch.cat([g0, g1], 1), ref_g))
    print("WORST", worst)
""")


def test_triton_kernels_match_references_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed (CI): bench/micro.py checks the kernels on GPU")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    p = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, env=env, cwd=root,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    worst = float(p.stdout.split("WORST")[-1])
    assert worst <= TOL, f"Triton kernels differ from the references by {worst:.2e}"
