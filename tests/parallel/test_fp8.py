"""FP8 in the tensor-parallel linears (torchao emulation on CPU, fp32 around the GEMMs).

The reference here is written from the recipes' definition, not from torchao: an operand is scaled
by fp8_max / amax (amax over the whole tensor, or per row along the GEMM's reduction axis; rowwise
recipes floor the scale to a power of two), saturated, rounded to e4m3 (or e5m2 for tensorwise
gradients) and divided back; the GEMM then runs in fp32 on those values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("torchao")

from megatrain.launch.testing import run_distributed  # noqa: E402
from megatrain.parallel.fp8 import Float8Gemm, choose, plan_fp8  # noqa: E402
from megatrain.parallelize import apply_fp8  # noqa: E402
from megatrain.parallel.layers import ColumnParallelLinear, RowParallelLinear, init_tp_param  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
EXACT = 1e-5  # our path vs the reference: same quantised values, fp32 sums in another order
# TP=2 vs TP=1: per-shard scales round differently, so the two differ by about as much as either differs
# from the exact product (independent errors of equal size: sqrt(2) x); allowed: 2 x the FP8 error of TP=1,
# which itself must stay below FP8_TOL (e5m2 gradients of tensorwise have 2 mantissa bits)
TP_FACTOR, FP8_TOL = 2.0, 0.15


def qdq(t: torch.Tensor, dtype: torch.dtype, dim: int | None, pow2: bool) -> torch.Tensor:
    """Quantise to ``dtype`` with amax scaling (per tensor, or per slice along ``dim``), dequantise."""
    if dtype is None:
        return t
    fmax = torch.finfo(dtype).max
    amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    scale = (fmax / amax.double().clamp(min=1e-12)).float()
    if pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return (t * scale).clamp(-fmax, fmax).to(dtype).float() / scale


def recipe_operands(recipe: str) -> dict:
    """(dtype, scaling dim) of every operand of the three GEMMs, as each recipe defines them.
    x is (M, K), w (N, K), g = dY (M, N); None dim = one scale per tensor, None dtype = high precision."""
    if recipe == "tensorwise":
        return {"x": (E4M3, None), "w": (E4M3, None), "g_dx": (E5M2, None), "w_dx": (E4M3, None),
                "g_dw": (E5M2, None), "x_dw": (E4M3, None), "pow2": False}
    ops = {"x": (E4M3, 1), "w": (E4M3, 1), "g_dx": (E4M3, 1), "w_dx": (E4M3, 0),
           "g_dw": (E4M3, 0), "x_dw": (E4M3, 0), "pow2": True}
    if recipe == "rowwise_with_gw_hp":
        ops.update(w_dx=(E4M3, None), g_dw=(None, None), x_dw=(None, None))
    return ops


def reference(recipe: str, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor):
    """y = x w^T, dx = g w, dw = g^T x on quantise-dequantised operands."""
    o = recipe_operands(recipe)
    q = {k: (lambda t, k=k: qdq(t, o[k][0], o[k][1], o["pow2"])) for k in o if k != "pow2"}
    return q["x"](x) @ q["w"](w).t(), q["g_dx"](g) @ q["w_dx"](w), q["g_dw"](g).t() @ q["x_dw"](x)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _rel_lines(a: torch.Tensor, b: torch.Tensor) -> float:
    """The worst relative error of any row or column of a 2-D result: with operands spanning many
    decades a whole-tensor norm would see only the largest entries."""
    d = a - b
    cols = (d.norm(dim=0) / b.norm(dim=0).clamp(min=1e-30)).max()
    rows = (d.norm(dim=1) / b.norm(dim=1).clamp(min=1e-30)).max()
    return max(cols.item(), rows.item())


def _run(layer, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad, layer.weight.grad.reshape(layer.out_features_local, -1)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("kind", ["column", "row"])
def test_fp8_linear_matches_the_quantise_dequantise_reference(recipe, kind):
    gen = torch.Generator().manual_seed(3)
    if kind == "column":  # canonical ND weight (2, 48, 64): the GEMM sees it as (96, 64)
        layer = ColumnParallelLinear(64, (2, 48))
    else:
        layer = RowParallelLinear(80, 32)
    k, n = layer.in_features_local, layer.out_features_local
    # Rows and columns spanning four decades: with power-of-2 scales the rounding of a value does not
    # depend on its scale unless it falls below e4m3's normal range, so only a wide range tells a
    # per-row scale from a per-column or per-tensor one.
    spread = lambda m, c: (torch.logspace(-4, 0, m)[torch.randperm(m, generator=gen)][:, None]  # noqa: E731
                           * torch.logspace(-4, 0, c)[torch.randperm(c, generator=gen)])
    with torch.no_grad():
        layer.weight.copy_((torch.randn(n, k, generator=gen) * spread(n, k)).reshape(layer.weight.shape))
    x = (torch.randn(21, k, generator=gen) * spread(21, k)).reshape(3, 7, k)
    g = (torch.randn(21, n, generator=gen) * spread(21, n) * 1e-3).reshape(3, 7, n)
    plain = _run(layer, x, g)
    layer.fp8_gemm = Float8Gemm.build(recipe, emulate=True)
    got = _run(layer, x, g)
    want = reference(recipe, x.reshape(-1, k), layer.weight.detach().reshape(n, k), g.reshape(-1, n))
    for name, a, b, p in zip(("y", "dx", "dw"), got, want, plain):
        a, p = a.reshape(b.shape), p.reshape(b.shape)
        assert _rel_lines(a, b) <= EXACT, (name, _rel_lines(a, b))
        if recipe == "rowwise_with_gw_hp" and name == "dw":  # this recipe's dW GEMM is the high-precision one
            assert _rel_lines(a, p) <= EXACT
        else:
            assert _rel(a, p) > 1e-3, f"{name}: the FP8 path equals the plain GEMM (not quantised?)"


def test_recipes_differ_where_their_definitions_do():
    gen = torch.Generator().manual_seed(0)
    x, w, g = torch.randn(16, 64, generator=gen), torch.randn(32, 64, generator=gen), torch.randn(16, 32, generator=gen)
    ts, rw, hp = (reference(r, x, w, g) for r in RECIPES)
    assert _rel(rw[2], hp[2]) > 1e-3 and _rel(hp[2], g.t() @ x) < 1e-6  # gw_hp: dW in high precision
    assert _rel(ts[0], rw[0]) > 1e-3


def _tp_pair(recipe: str) -> dict:
    """An MLP-shaped column -> row pair at TP=1 and TP=2 with the same canonical weights."""
    from megatrain.parallel.state import ParallelState

    st = ParallelState.build(tp_size=dist.get_world_size())
    out = {}
    for name, group in (("exact", None), ("tp1", None), ("tp2", st.tp_group)):
        col = ColumnParallelLinear(64, 128, tp_group=group)
        row = RowParallelLinear(128, 64, tp_group=group)
        init_tp_param(col.weight, 0.5, "col", 11)
        init_tp_param(row.weight, 0.5, "row", 11)
        for lin in (col, row):
            lin.fp8_gemm = None if name == "exact" else Float8Gemm.build(recipe, emulate=True)
        x = torch.randn(4, 9, 64, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
        h = col(x)  # (B, T, 128 / tp), this rank's columns
        ref_h = reference(recipe, x.detach().reshape(-1, 64), col.weight.detach().reshape(-1, 64),
                          torch.zeros(36, h.shape[-1]))[0]
        if name != "exact":
            out[name + "_col_vs_shard_reference"] = _rel(h.detach().reshape(-1, h.shape[-1]), ref_h)
        y = row(torch.relu(h))  # (B, T, 64) after the bf16/fp32 all-reduce
        y.square().sum().backward()
        out[name] = (y.detach(), x.grad)
    return out


def _plan_matches_model(tp_group) -> bool:
    """plan_fp8 (config only) against apply_fp8 on a model built on the meta device, auto rule, for
    shapes where some linears pass and some do not (TinyLlama at TP=2 under rowwise)."""
    from megatrain.config import load_config
    from megatrain.model.llama import Ctx, LlamaModel
    from megatrain.parallel.layers import tp_info

    big = load_config(None, ["model.preset=tinyllama-1.1b", "model.num_layers=2"]).model
    for recipe in ("tensorwise", "rowwise"):
        train = load_config(None, [f"train.fp8={recipe}"]).train
        with torch.device("meta"):
            meta = LlamaModel(big, Ctx(tp_group=tp_group))
        plan = plan_fp8(big, tp_info(tp_group)[1], train)
        if plan != apply_fp8(meta, recipe, emulate=True) or all(c.fp8 for c in plan) != (recipe == "tensorwise"):
            return False
    return True


def _tp_pairs(recipes: list[str]) -> dict:
    from megatrain.parallel.state import ParallelState

    out = {r: _tp_pair(r) for r in recipes}  # one set of processes for all recipes (start-up dominates)
    out["plan"] = _plan_matches_model(ParallelState.build(tp_size=dist.get_world_size()).tp_group)
    return out


def test_tp2_fp8_matches_tp1_fp8():
    results = run_distributed(_tp_pairs, 2, ["tensorwise", "rowwise"])[0]
    assert results.pop("plan")  # the start report's plan at TP=2 is what the TP=2 model does
    for recipe, got in results.items():
        assert got["tp1_col_vs_shard_reference"] <= EXACT and got["tp2_col_vs_shard_reference"] <= EXACT, recipe
        for i, what in enumerate(("y", "dx")):
            exact, tp1, tp2 = got["exact"][i], got["tp1"][i], got["tp2"][i]
            fp8_err = _rel(tp1, exact)
            assert 1e-3 < fp8_err <= FP8_TOL, (recipe, what, fp8_err)
            assert _rel(tp2, tp1) <= TP_FACTOR * fp8_err, (recipe, what, _rel(tp2, tp1), fp8_err)


def test_size_rule_follows_the_recipe_thresholds():
    def on(n, k, recipe="tensorwise", rule="auto", exclude=()):
        return choose("blocks.0.mlp.down", n, k, recipe, rule, list(exclude)).fp8

    assert on(4096, 4096) and not on(1024, 4096) and on(1024, 8192)  # tensorwise: K<=4096 and N<=1024 lose
    assert not on(4096, 2048, "rowwise") and on(8192, 2048, "rowwise") and not on(8192, 1024, "rowwise")
    assert not on(4096, 4104) and on(64, 64, rule="all") and not on(64, 72, rule="all")  # multiples of 16
    assert not on(4096, 4096, exclude=[r"mlp\.down"]) and on(4096, 4096, exclude=[r"attn"])


def test_only_block_linears_are_converted_and_state_dict_is_unchanged():
    from megatrain.config import load_config
    from megatrain.model import build_model

    cfg = load_config(None, ["model.preset=debug"]).model
    model = build_model(cfg, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    choices = apply_fp8(model, "tensorwise", rule="all", exclude=[r"^blocks\.1\.attn\.o$"])
    assert [c.name for c in choices if c.fp8] == ["blocks.0.attn.qkv", "blocks.0.attn.o", "blocks.0.mlp.gate_up",
                                                  "blocks.0.mlp.down", "blocks.1.attn.qkv", "blocks.1.mlp.gate_up",
                                                  "blocks.1.mlp.down"]
    assert model.head.proj.fp8_gemm is None and model.blocks[1].attn.o.fp8_gemm is None
    # the start report's plan, made from the config alone, is the decision apply_fp8 takes
    train = load_config(None, ["train.fp8=tensorwise", "train.fp8_filter=all",
                               r"train.fp8_exclude=[^blocks\.1\.attn\.o$]"]).train
    assert plan_fp8(cfg, 1, train) == choices
    assert _plan_matches_model(None)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(v.dtype.itemsize == 1 and v.is_floating_point() for v in after.values())


def _count_gemms(recipe: str) -> dict:
    """GEMMs run in backward under selective recomputation: the forward GEMM outputs must be saved
    (not recomputed), FP8 or not."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatrain.config import load_config
    from megatrain.model import build_model
    from megatrain.parallelize import apply_activation_checkpointing

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten._scaled_mm.default, torch.ops.aten.addmm.default):
                self.n += 1
            return func(*args, **(kwargs or {}))

    cfg = load_config(None, ["model.preset=debug", "model.num_layers=1"]).model
    counts = {}
    for mode in ("none", "selective", "full"):
        model = build_model(cfg, seed=1)
        if recipe != "off":
            apply_fp8(model, recipe, rule="all")
        apply_activation_checkpointing(model, mode)
        x = torch.randn(2, 8, cfg.hidden_size, requires_grad=True)
        y = model.blocks[0](x)
        with Count() as c:
            y.sum().backward()
        counts[mode] = c.n
    return counts


@pytest.mark.parametrize("recipe", ["off", "tensorwise"])
def test_selective_recomputation_keeps_the_fp8_gemm_outputs(recipe):
    counts = _count_gemms(recipe)
    assert counts["selective"] == counts["none"], counts  # no forward GEMM re-run in backward
    assert counts["full"] > counts["none"], counts  # the counter sees the recomputed GEMMs when they happen


def _zero3_saved(recipe: str) -> dict:
    """ZeRO-3 at DP=2 with every parameter partitioned (persistence threshold 0): after the forward,
    nothing autograd saved may hold the storage of a gathered full weight."""
    from megatrain.config import load_config
    from megatrain.data.batch import plan_batch
    from megatrain.engine import build_ds_config, build_engine
    from megatrain.parallel.state import ParallelState

    cfg = load_config(None, ["model.preset=debug", "deepspeed.zero_stage=3", f"train.fp8={recipe}",
                             "train.fp8_filter=all", "train.precision=fp32", "train.micro_batch_size=1"])
    st = ParallelState.build(1, 1)
    plan = plan_batch(cfg.train, st.dp_size)
    ds_config = build_ds_config(cfg, plan)
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    built = build_engine(cfg, st, torch.device("cpu"), plan, ds_config)
    engine, module = built.engine, built.module
    linears = [lin for blk in module.blocks for lin in (blk.attn.qkv, blk.attn.o, blk.mlp.gate_up, blk.mlp.down)]
    # partitioned weights hold no data here: the decisions must still see the shard shapes
    plan_ok = apply_fp8(module, recipe, rule="all", emulate=True) == plan_fp8(cfg.model, 1, cfg.train)
    gathered, held = [], []
    for lin in linears:  # runs after DeepSpeed's own pre-hook has gathered the weight
        lin.register_forward_pre_hook(lambda m, i: gathered.append(m.weight.numel() > 0))

    def pack(t):  # a saved tensor on a gathered weight's storage must be the parameter itself
        live = {lin.weight.untyped_storage().data_ptr() for lin in linears if lin.weight.numel()}
        if t.untyped_storage().data_ptr() in live and not any(t is lin.weight for lin in linears):
            held.append(tuple(t.shape))
        return t

    tokens = torch.randint(0, cfg.model.vocab_size, (1, 17), generator=torch.Generator().manual_seed(dist.get_rank()))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = engine(tokens[:, :-1], tokens[:, 1:])
    released = all(lin.weight.numel() == 0 for lin in linears)
    engine.backward(loss)
    engine.step()
    return {"held": held, "gathered": sum(gathered), "released": released, "plan_ok": plan_ok, "loss": loss.item(),
            "fp8": sum(lin.fp8_gemm is not None for lin in linears)}


def test_zero3_fp8_does_not_keep_gathered_weights_until_backward():
    got = run_distributed(_zero3_saved, 2, "tensorwise")
    assert all(g["gathered"] == 8 and g["released"] and g["fp8"] == 8 and g["plan_ok"] for g in got), got
    assert all(g["held"] == [] for g in got), got
    assert all(math.isfinite(g["loss"]) for g in got)
