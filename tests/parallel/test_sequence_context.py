"""Sequence parallelism (inside TP) and Ulysses context parallelism compute what one process computes:
loss, logits and every gathered gradient, fp32, 1e-5 relative. One 4-rank spawn runs every layout."""

import pytest
import torch
import torch.distributed as dist

from megatrain.config import ConfigError, load_config, validate
from megatrain.launch.testing import run_distributed
from megatrain.model import build_model
from megatrain.parallel import IGNORE_INDEX, ParallelState
from megatrain.parallel.context import context_slice

RTOL = 1e-5
T = 24  # divisible by every TP x CP product used here


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def _full_grad(p: torch.Tensor, st: ParallelState) -> torch.Tensor:
    """The whole gradient of one parameter as DeepSpeed would see it after its data x context average,
    gathered over TP."""
    g = p.grad.clone()
    if st.cp_size > 1:  # what DeepSpeed does over the data x context group: average
        dist.all_reduce(g, group=st.cp_group)
        g /= st.cp_size
    dim = getattr(p, "partition_dim", None)
    if dim is None or st.tp_size == 1:
        return g
    parts = [torch.empty_like(g) for _ in range(st.tp_size)]
    dist.all_gather(parts, g.contiguous(), group=st.tp_group)
    return torch.cat(parts, dim=dim)


def _case(tp: int, cp: int, sp: bool, kv: int, tied: bool) -> dict:
    st = ParallelState.build(tp_size=tp, cp_size=cp)
    cfg = load_config(None, ["model.preset=debug", "model.num_heads=4", f"model.num_kv_heads={kv}",
                             f"model.tie_embeddings={tied}", "model.vocab_size=256"]).model
    ref = build_model(cfg, seed=7)
    par = build_model(cfg, tp_group=st.tp_group, seed=7, sequence_parallel=sp, cp_group=st.cp_group,
                      loss_chunk_tokens=5)  # several chunks, one ragged
    tokens = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    labels = tokens.roll(-1, 1)
    labels[0, :9] = IGNORE_INDEX  # uneven valid counts over the context slices (all of slice 0 at cp=4)
    ref_loss = ref(tokens, labels)
    ref_loss.backward()
    mine_t, mine_l = context_slice(tokens, st.cp_rank, cp), context_slice(labels, st.cp_rank, cp)
    loss = par(mine_t, mine_l)
    loss.backward()
    errs = {"loss": _rel(loss.detach(), ref_loss.detach())}
    with torch.no_grad():
        errs["logits"] = _rel(par(mine_t), ref(tokens))
    for (n, p), (_, q) in zip(ref.named_parameters(), par.named_parameters()):
        errs[n] = _rel(_full_grad(q, st), p.grad)
    return errs


CASES = {  # (tp, cp, sp, kv heads, tied)
    "SP tp2": (2, 1, True, 2, False),
    "SP tp4 tied": (4, 1, True, 4, True),
    "CP2": (1, 2, False, 2, False),
    "CP4 (KV replicated)": (1, 4, False, 2, True),
    "CP2 x TP2": (2, 2, False, 2, False),
    "CP2 x TP2 + SP (KV replicated)": (2, 2, True, 2, False),
}


def _all_cases() -> dict:
    return {name: _case(*args) for name, args in CASES.items()}


def test_sequence_and_context_parallel_match_one_process():
    results = run_distributed(_all_cases, 4)
    for rank, per_case in enumerate(results):
        for case, errs in per_case.items():
            worst = max(errs, key=errs.get)
            assert errs[worst] <= RTOL, f"rank {rank}, {case}: {worst} rel err {errs[worst]:.2e}"


@pytest.mark.parametrize("overrides, match", [
    (["parallel.sequence_parallel=true"], "needs parallel.tensor >= 2"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true", "train.seq_len=33", "model.max_seq_len=64"],
     r"train.seq_len=33 is not divisible by parallel.tensor=2"),
    (["parallel.context=2", "train.seq_len=33", "model.max_seq_len=64"], "not divisible by parallel.context=2"),
    (["parallel.context=2", "parallel.tensor=2", "parallel.sequence_parallel=true", "train.seq_len=34",
      "model.max_seq_len=64"], r"train.seq_len / parallel.context = 17 is not divisible by parallel.tensor=2"),
    (["parallel.context=8"], r"model.num_heads=4 is not divisible by parallel.tensor x parallel.context"),
    (["model.num_heads=12", "model.num_kv_heads=3", "model.hidden_size=96", "parallel.context=4"],
     "one must divide the other"),
    (["parallel.context=2", "model.dropout=0.1"], "dropout masks would repeat"),
])
def test_sequence_split_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):  # load_config validates what needs no world size
        load_config(None, ["model.preset=debug", "train.seq_len=32"] + overrides)


def test_world_must_hold_the_context_axis():
    cfg = load_config(None, ["model.preset=debug", "parallel.context=2", "parallel.tensor=2"])
    validate(cfg, 4)
    with pytest.raises(ConfigError, match="parallel.tensor x parallel.context x parallel.pipeline"):
        validate(cfg, 6)
