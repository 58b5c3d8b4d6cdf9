"""Offline resharding: TP=2 -> TP=1 -> TP=4 (x PP=2) leaves the logits unchanged, run at the real TP size."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from megatrain.checkpoint import layout
from megatrain.launch.testing import run_distributed
from tests.convert.conftest import convert, debug_config, make_checkpoint


def _load_rank(ckpt: str, group) -> torch.nn.Module:
    """The TP model of this rank in ``group``, from this rank's own shard files (all its PP stages)."""
    import torch.distributed as dist

    from megatrain.model import build_model

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    meta = layout.read_meta(ckpt)
    assert meta["topology"]["tp"] == size
    sd = {}
    for pp in range(meta["topology"]["pp"]):
        sd.update(load_file(str(layout.shard_path(ckpt, rank, pp))))
    model = build_model(layout.model_config_of(meta), tp_group=group).eval()
    model.load_state_dict(sd, strict=True)
    return model


def _tp2_and_tp4_logits(ckpt2: str, ckpt4: str, tokens: torch.Tensor):
    """On 4 ranks: logits of the TP=2 checkpoint (two TP=2 groups) and of the TP=4 one (the world)."""
    import torch.distributed as dist

    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    with torch.no_grad():
        tp2 = _load_rank(ckpt2, pairs[dist.get_rank() // 2])(tokens)
        tp4 = _load_rank(ckpt4, dist.group.WORLD)(tokens)
    # numpy, not tensors: a tensor crosses the result queue as shared memory that dies with the process
    return tp2.numpy(), tp4.numpy()


def test_reshard_tp2_tp1_tp4(tmp_path: Path):
    cfg = debug_config("model.num_kv_heads=4")  # 4 KV heads, FFN 160, vocab 512: all split 4 ways
    sd = make_checkpoint(tmp_path / "tp2", cfg, tp=2)
    assert convert(tmp_path / "tp2", tmp_path / "tp1", "--to", "megatrain") == 0
    assert convert(tmp_path / "tp1", tmp_path / "tp4", "--to", "megatrain", "--tp", "4", "--pp", "2") == 0
    assert sorted(p.name for p in (tmp_path / "tp4" / "model").iterdir()) == \
        [f"tp{t:02d}_pp{p:02d}.safetensors" for t in range(4) for p in range(2)]
    for name in ("tp1", "tp4"):
        _, full = layout.load_canonical_weights(tmp_path / name, verify="full")
        assert all(torch.equal(full[k], sd[k]) for k in sd), name
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    results = run_distributed(_tp2_and_tp4_logits, 4, str(tmp_path / "tp2"), str(tmp_path / "tp4"), tokens)
    ref = torch.from_numpy(results[0][0])
    assert (_tp_logits_single(tmp_path / "tp1", tokens) - ref).abs().max().item() <= 1e-5
    for tp2, tp4 in results:
        assert (torch.from_numpy(tp2) - ref).abs().max().item() <= 1e-5
        assert (torch.from_numpy(tp4) - ref).abs().max().item() <= 1e-5


def _tp_logits_single(ckpt: Path, tokens: torch.Tensor) -> torch.Tensor:
    from megatrain.model import build_model

    meta, full = layout.load_canonical_weights(ckpt)
    model = build_model(layout.model_config_of(meta)).eval()
    model.load_state_dict(full)
    with torch.no_grad():
        return model(tokens)
