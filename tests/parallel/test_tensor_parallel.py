"""TP=2 and TP=4 compute what TP=1 computes: loss, logits and (gathered) gradients, fp32."""

import pytest
import torch
import torch.distributed as dist

from megatrain.config import load_config
from megatrain.model import build_model
from megatrain.parallel import IGNORE_INDEX, ParallelState, fused_linear_cross_entropy, shard_of
from megatrain.parallel import vocab_parallel_cross_entropy
from megatrain.launch.testing import run_distributed

RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def _gather_full(p: torch.Tensor, grad: torch.Tensor, group) -> torch.Tensor:
    dim = getattr(p, "partition_dim", None)
    if dim is None:
        return grad
    parts = [torch.empty_like(grad) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, grad.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _check_model(kv_heads: int, tied: bool) -> dict:
    st = ParallelState.build(tp_size=dist.get_world_size())
    cfg = load_config(None, ["model.preset=debug", "model.num_heads=4", f"model.num_kv_heads={kv_heads}",
                             f"model.tie_embeddings={tied}", "model.vocab_size=256"]).model
    ref = build_model(cfg, seed=7)  # TP=1, every rank holds all of it
    tp = build_model(cfg, tp_group=st.tp_group, seed=7)
    # same weights: TP-invariant init; check it rather than assume it, then load to be exact
    for (n, p), (_, q) in zip(ref.named_parameters(), tp.named_parameters()):
        assert torch.equal(shard_of(p.data, getattr(q, "partition_dim", None), st.tp_rank, st.tp_size), q.data), n
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = tokens.roll(-1, 1)
    labels[0, :3] = IGNORE_INDEX
    out = {}
    for model in (ref, tp):
        model.zero_grad()
        loss = model(tokens, labels)
        loss.backward()
        out[model is tp] = (loss.detach(), model(tokens).detach())
    (l1, z1), (l2, z2) = out[False], out[True]
    errs = {"loss": _rel(l2, l1), "logits": _rel(z2, z1)}
    for (n, p), (_, q) in zip(ref.named_parameters(), tp.named_parameters()):
        errs[n] = _rel(_gather_full(q, q.grad, st.tp_group), p.grad)
    return errs


def _all_cases():
    return {(kv, tied): _check_model(kv, tied) for kv in (2, 4) for tied in (False, True)
            if kv % dist.get_world_size() == 0}


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_tp1(tp):
    results = run_distributed(_all_cases, tp)
    assert results[0], "no case ran"
    for rank_result in results:
        for case, errs in rank_result.items():
            worst = max(errs, key=errs.get)
            assert errs[worst] <= RTOL, f"TP={tp} kv_heads,tied={case}: {worst} rel err {errs[worst]:.2e}"


def _check_loss() -> dict:
    st = ParallelState.build(tp_size=dist.get_world_size())
    g = torch.Generator().manual_seed(0)
    n, v, c = 37, 64, 16
    logits = torch.randn(n, v, generator=g) * 4
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = IGNORE_INDEX
    ref_in = logits.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_in, labels, ignore_index=IGNORE_INDEX)
    ref.backward()
    loc = shard_of(logits, 1, st.tp_rank, st.tp_size).clone().requires_grad_()
    per_tok = vocab_parallel_cross_entropy(loc, labels, st.tp_group)
    loss = per_tok.sum() / (labels != IGNORE_INDEX).sum()
    loss.backward()
    errs = {"vp_loss": abs(loss.item() - ref.item()),
            "vp_grad": (loc.grad - shard_of(ref_in.grad, 1, st.tp_rank, st.tp_size)).abs().max().item()}
    # fused head + loss, small chunks so several chunks run, against logits computed in full
    h = torch.randn(n, c, generator=g, dtype=torch.float64).float()
    w = torch.randn(v, c, generator=g) * 0.5
    h_ref, w_ref = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref2 = torch.nn.functional.cross_entropy(h_ref @ w_ref.t(), labels, ignore_index=IGNORE_INDEX)
    ref2.backward()
    from megatrain.parallel import copy_to_tp
    h_tp = h.clone().requires_grad_()
    w_tp = shard_of(w, 0, st.tp_rank, st.tp_size).clone().requires_grad_()
    fused = fused_linear_cross_entropy(copy_to_tp(h_tp, st.tp_group), w_tp, labels, st.tp_group, chunk_tokens=8)
    (fused * 0.5).backward()  # a non-unit upstream gradient must scale both gradients
    errs["fused_loss"] = abs(fused.item() - ref2.item())
    errs["fused_grad_h"] = (h_tp.grad - 0.5 * h_ref.grad).abs().max().item()
    errs["fused_grad_w"] = (w_tp.grad - 0.5 * shard_of(w_ref.grad, 0, st.tp_rank, st.tp_size)).abs().max().item()
    return errs


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_cross_entropy_matches_torch(tp):
    for errs in run_distributed(_check_loss, tp):
        for k, e in errs.items():
            assert e <= 1e-6, f"TP={tp}: {k} differs by {e:.2e}"


def test_all_ignored_gives_zero_not_nan():
    logits = torch.randn(4, 10, requires_grad=True)
    labels = torch.full((4,), IGNORE_INDEX)
    from megatrain.parallel import masked_mean
    loss = masked_mean(vocab_parallel_cross_entropy(logits, labels), labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)
