"""Document-masked attention: a packed sample gives every token the logits of its document run alone,
at TP=1, TP=2 and PP=2; the kernels (sdpa reference, flex, varlen packing) agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatrain.config import load_config
from megatrain.launch.testing import run_distributed
from megatrain.model import documents
from megatrain.model.llama import build_model

TOL = 1e-5
LENGTHS = [(7, 12, 13), (20, 1, 11)]  # two samples of 32 tokens, three documents each
SEQ = 32


def _packed(vocab: int, seed: int = 0):
    """tokens (B, T), position_ids (B, T) and every sample's documents as separate token tensors."""
    g = torch.Generator().manual_seed(seed)
    docs = [[torch.randint(0, vocab, (n,), generator=g) for n in row] for row in LENGTHS]
    tokens = torch.stack([torch.cat(row) for row in docs])
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS])
    return tokens, pos, docs


def _alone(model, docs) -> torch.Tensor:
    """Logits of every document run on its own from position 0, laid out like the packed batch."""
    return torch.stack([torch.cat([model(d[None])[0] for d in row]) for row in docs])


def _model_cfg():
    return load_config(None, ["model.preset=debug"]).model


def test_packed_sample_matches_each_document_alone():
    cfg = _model_cfg()
    model = build_model(cfg, seed=3).eval()
    tokens, pos, docs = _packed(cfg.vocab_size)
    with torch.no_grad():
        packed = model(tokens, position_ids=pos)
        alone = _alone(model, docs)
        plain = model(tokens)
    assert (packed - alone).abs().max().item() <= TOL
    # without the layout the later documents see the earlier ones: the test can tell
    assert (plain - alone).abs().max().item() > 1e-2


def test_rope_at_document_positions():
    """RoPE tables follow the document positions; since RoPE scores depend only on i - j, restarting
    them inside the mask changes logits by rounding only (data.document_positions=false is the same model)."""
    from megatrain.model import kernels

    cfg = _model_cfg()
    on = build_model(cfg, seed=3).eval()
    off = build_model(cfg, seed=3, document_positions=False).eval()
    tokens, pos, docs = _packed(cfg.vocab_size)
    rotary = on.blocks[0].attn.rotary
    cos, sin = documents.layout_for(pos).rope_tables(rotary)
    table_cos, table_sin = rotary.tables(SEQ, torch.device("cpu"))
    assert cos.shape == (2, SEQ, cfg.head_dim) and torch.equal(cos[1, 20], table_cos[0])  # doc 2 of sample 1
    assert torch.equal(sin, table_sin[pos])
    # per-sample tables rotate each sample as its own (T, D) table would
    q, k = torch.randn(2, SEQ, 4, cfg.head_dim), torch.randn(2, SEQ, 2, cfg.head_dim)
    rq, rk = kernels.apply_rope_reference(q, k, cos, sin)
    for b in range(2):
        eq, ek = kernels.apply_rope_reference(q[b:b + 1], k[b:b + 1], cos[b], sin[b])
        assert torch.equal(rq[b:b + 1], eq) and torch.equal(rk[b:b + 1], ek)
    with torch.no_grad():
        assert (off(tokens, position_ids=pos) - _alone(on, docs)).abs().max().item() <= TOL


def _tp2_logits(seed: int):
    import torch.distributed as dist

    from megatrain.parallel.state import ParallelState

    st = ParallelState.build(2, 1)
    cfg = _model_cfg()
    model = build_model(cfg, tp_group=st.tp_group, seed=seed).eval()
    tokens, pos, docs = _packed(cfg.vocab_size)
    with torch.no_grad():
        out = (model(tokens, position_ids=pos), _alone(model, docs))
    dist.barrier()
    return out


def test_packed_sample_matches_each_document_alone_tp2():
    got = run_distributed(_tp2_logits, 2, 3)
    cfg = _model_cfg()
    single = build_model(cfg, seed=3).eval()
    tokens, pos, docs = _packed(cfg.vocab_size)
    with torch.no_grad():
        alone = _alone(single, docs)
    for packed, alone_tp in got:
        assert (packed - alone_tp).abs().max().item() <= TOL
        assert (packed - alone).abs().max().item() <= TOL


def _pp2_logits(overrides: list[str]):
    """Logits of the packed batch through a 2-stage DeepSpeed pipeline (last stage), else None."""
    import torch.distributed as dist

    from megatrain.data.batch import plan_batch
    from megatrain.engine import build_ds_config, build_engine, pipeline_batches
    from megatrain.parallel.state import ParallelState

    cfg = load_config(None, overrides)
    st = ParallelState.build(1, 2)
    plan = plan_batch(cfg.train, st.dp_size)
    built = build_engine(cfg, st, torch.device("cpu"), plan, build_ds_config(cfg, plan))
    tokens, pos, _ = _packed(cfg.model.vocab_size)
    labels = torch.zeros_like(tokens)
    batches = pipeline_batches(iter([(tokens, labels, pos)]))
    _, logits = built.engine.eval_batch(data_iter=batches, num_micro_batches=1, return_logits=True)
    dist.barrier()
    return logits if st.pp_rank == 1 else None


def test_packed_sample_matches_each_document_alone_pp2():
    overrides = ["model.preset=debug", "parallel.pipeline=2", "train.micro_batch_size=2", "train.precision=fp32",
                 "train.seq_len=32", "deepspeed.zero_stage=0", "data.document_mask=true", "train.seed=5"]
    got = run_distributed(_pp2_logits, 2, overrides)
    cfg = load_config(None, overrides)
    single = build_model(cfg.model, seed=5).eval()
    _, _, docs = _packed(cfg.model.vocab_size)
    with torch.no_grad():
        alone = _alone(single, docs)
    assert got[0] is None
    assert (got[1] - alone).abs().max().item() <= TOL


# --------------------------------------------------------------------------- kernels


def _qkv(b=2, h=4, k=2, t=SEQ, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, t, d, generator=g) for n in (h, k, k)]


def _layout():
    return documents.DocumentLayout(torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS]))


def _per_document(q, k, v) -> torch.Tensor:
    """Causal SDPA over each document separately: what block-causal attention must equal."""
    out = torch.empty_like(q)
    for b, row in enumerate(LENGTHS):
        s = 0
        for n in row:
            sl = slice(s, s + n)
            out[b, :, sl] = F.scaled_dot_product_attention(q[b:b + 1, :, sl], k[b:b + 1, :, sl], v[b:b + 1, :, sl],
                                                           is_causal=True, enable_gqa=True)[0]
            s += n
    return out


def test_sdpa_reference_is_per_document_causal():
    q, k, v = _qkv()
    assert (documents.attention_sdpa(q, k, v, _layout()) - _per_document(q, k, v)).abs().max().item() <= TOL


def test_flex_block_mask_matches_the_reference():
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = _qkv(t=SEQ)
    with torch.no_grad():  # flex_attention has no backward on CPU; the forward checks the block mask
        got = documents.attention_flex(q, k, v, _layout())
    assert (got - _per_document(q, k, v)).abs().max().item() <= TOL


def test_varlen_packing_and_cu_seqlens():
    q, k, v = _qkv()
    layout = _layout()
    cu, longest = layout.cu_seqlens()
    assert cu.tolist() == [0, 7, 19, 32, 52, 53, 64] and longest == 20 and cu.dtype == torch.int32

    def kernel(qp, kp, vp, cu, max_len, gqa):  # (N, H, D): causal SDPA per cu_seqlens segment
        out = torch.empty_like(qp)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            seg = [x[a:b].transpose(0, 1)[None] for x in (qp, kp, vp)]
            out[a:b] = F.scaled_dot_product_attention(*seg, is_causal=True, enable_gqa=gqa)[0].transpose(0, 1)
        return out

    q_btd = q.transpose(1, 2).contiguous().transpose(1, 2)  # as the model hands it over: a (B, T, H, D) view
    got = documents.attention_varlen(q_btd, k, v, layout, kernel=kernel)
    assert (got - _per_document(q, k, v)).abs().max().item() <= TOL


def test_layout_is_built_once_per_tensor_and_freed_with_it():
    import gc

    pos = _layout().position_ids.clone()
    lay = documents.layout_for(pos)
    assert documents.layout_for(pos) is lay and documents.layout_for(pos.clone()) is not lay
    mask = lay.dense_mask()
    assert lay.dense_mask() is mask and mask.shape == (2, 1, SEQ, SEQ)
    del lay, mask, pos
    gc.collect()
    assert len(documents._layouts) == 0


def test_dispatch_falls_back_to_sdpa_on_cpu(caplog):
    q, k, v = _qkv()
    documents.configure("auto")
    assert documents._backend == "sdpa"  # no GPU here
    saved = documents._backend
    try:
        documents._backend = "flex"  # asked for, but the tensors are on the CPU
        got = documents.attention(q, k, v, _layout())
    finally:
        documents._backend = saved
    assert (got - _per_document(q, k, v)).abs().max().item() <= TOL
    assert "using sdpa" in caplog.text


def test_config_keys_are_checked():
    from megatrain.config import ConfigError

    cfg = load_config(None, ["data.document_mask=true", "data.eod_mask_loss=true"])
    assert cfg.data.document_mask and cfg.data.document_positions and cfg.train.document_attention == "auto"
    with pytest.raises(ConfigError, match="train.document_attention"):
        load_config(None, ["train.document_attention=dense"])
    with pytest.raises(ConfigError, match="no attention dropout"):
        load_config(None, ["data.document_mask=true", "train.document_attention=flex", "model.dropout=0.1"])
    load_config(None, ["data.document_mask=true", "model.dropout=0.1"])  # auto: sdpa carries dropout


def test_compiled_blocks_take_the_layout():
    from megatrain.parallelize import apply_compile

    cfg = _model_cfg()
    plain, compiled = build_model(cfg, seed=4), build_model(cfg, seed=4)
    apply_compile(compiled, seq_len=SEQ, backend="eager")  # dynamo's tracing (the GPU adds Inductor)
    tokens, pos, _ = _packed(cfg.vocab_size)
    for _ in range(2):  # a new layout per micro-batch
        p = pos.clone()
        assert (compiled(tokens, position_ids=p) - plain(tokens, position_ids=p)).abs().max().item() <= TOL


def _cp2_logits_and_grads() -> dict:
    """Context parallelism (Ulysses, CP=2): each rank holds half of every sample's tokens but the whole
    position_ids; logits and the loss gradient must equal one process's with the same document layout."""
    import torch.distributed as dist

    from megatrain.parallel import ParallelState
    from megatrain.parallel.context import context_slice

    st = ParallelState.build(cp_size=2)
    cfg = load_config(None, ["model.preset=debug", "model.num_heads=4", "model.num_kv_heads=2"]).model
    ref, par = build_model(cfg, seed=3), build_model(cfg, seed=3, cp_group=st.cp_group)
    tokens, pos, docs = _packed(cfg.vocab_size)
    labels = tokens.roll(-1, 1)
    ref(tokens, labels, position_ids=pos).backward()
    mine = context_slice(tokens, st.cp_rank, 2)
    par(mine, context_slice(labels, st.cp_rank, 2), position_ids=pos).backward()
    with torch.no_grad():
        logits_err = (par(mine, position_ids=pos) - _alone(ref.eval(), docs)).abs().max().item()
    grad_err = 0.0
    for p, q in zip(ref.parameters(), par.parameters()):
        g = q.grad.clone()
        dist.all_reduce(g, group=st.cp_group)  # DeepSpeed averages over data x context ranks
        grad_err = max(grad_err, ((g / 2 - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-12)).item())
    return {"logits": logits_err, "grads": grad_err}


def test_packed_sample_under_context_parallelism():
    from megatrain.launch.testing import run_distributed

    for r in run_distributed(_cp2_logits_and_grads, 2):
        assert r["logits"] <= TOL and r["grads"] <= TOL, r
