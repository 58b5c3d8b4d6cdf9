"""ZeRO-3 builds the model in partitions (deepspeed.zero.Init): no rank holds the whole model, yet the
weights are the ones every other layout starts from."""

import pytest
import torch

from megatrain.launch.testing import run_distributed


def _build(tp: int, offload: str) -> dict:
    import deepspeed
    import torch.distributed as dist

    from megatrain.config import load_config
    from megatrain.data.batch import plan_batch
    from megatrain.engine import build_ctx, build_ds_config, build_partitioned_model
    from megatrain.optim import param_groups
    from megatrain.model import build_model
    from megatrain.parallel import ParallelState, shard_of

    cfg = load_config(None, ["model.preset=debug", "model.rope_theta=500000", "train.precision=fp32",
                             "deepspeed.zero_stage=3", f"deepspeed.offload={offload}", f"parallel.tensor={tp}",
                             "train.micro_batch_size=1", f"train.global_batch_size={dist.get_world_size() // tp}",
                             "train.seed=11"])
    st = ParallelState.build(tp_size=tp)
    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
    ds_config = build_ds_config(cfg, plan_batch(cfg.train, st.dp_size))
    model = build_partitioned_model(cfg, st, build_ctx(cfg, st, torch.device("cpu")), ds_config)
    ref = build_model(cfg.model, seed=11)  # unpartitioned, TP=1: what every layout starts from
    out = {"held": 0, "total": 0, "mismatch": []}
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        out["held"] += p.ds_tensor.numel()
        out["total"] += q.numel()
        assert p.numel() == 0, f"{name}: the full parameter is materialised outside a gather"
        with deepspeed.zero.GatheredParameters([p]):
            want = shard_of(q.data, getattr(p, "partition_dim", None), st.tp_rank, st.tp_size)
            if not torch.equal(p.data, want):
                out["mismatch"].append(name)
    decay, no_decay = param_groups(model, 0.1)
    out["decay_shapes"] = [sorted({len(p.ds_shape) for p in g["params"]}) for g in (decay, no_decay)]
    out["rotary_max_err"] = _rotary_err(model, ref)
    return out


def _rotary_err(model, ref) -> float:
    """RoPE tables of the partitioned build against the plain one (zero.Init casts tensors made in it)."""
    a = model.blocks[0].attn.rotary.tables(64, torch.device("cpu"))
    b = ref.blocks[0].attn.rotary.tables(64, torch.device("cpu"))
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("tp,offload", [(1, "none"), (2, "all")])
def test_zero3_builds_partitioned_with_the_same_weights(tp, offload):
    world = 4 if tp == 2 else 2
    results = run_distributed(_build, world, tp, offload)
    dp = world // tp
    for rank, r in enumerate(results):
        assert not r["mismatch"], f"rank {rank}: weights differ from the unpartitioned model: {r['mismatch']}"
        # each rank keeps ~1/dp of its TP shard (DeepSpeed pads each parameter to a multiple of dp)
        assert r["held"] <= r["total"] / tp / dp * 1.05 + 64, (rank, r["held"], r["total"])
        decay_dims, no_decay_dims = r["decay_shapes"]  # matrices decay, norm weights do not
        assert min(decay_dims) >= 2 and no_decay_dims == [1], r["decay_shapes"]
        assert r["rotary_max_err"] == 0.0, r["rotary_max_err"]
