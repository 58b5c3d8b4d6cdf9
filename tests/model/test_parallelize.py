"""megatrain.parallelize: recomputation applied from outside the model keeps loss, gradients and names."""

import pytest
import torch

from megatrain.config import load_config
from megatrain.model.llama import build_model
from megatrain.parallelize import apply_activation_checkpointing, parallelize


def _loss_and_grads(model, tokens):
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recomputation_keeps_loss_gradients_and_parameter_names(mode):
    cfg = load_config(None, ["model.preset=debug"]).model
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    plain, wrapped = build_model(cfg, seed=5), build_model(cfg, seed=5)
    names = [n for n, _ in wrapped.named_parameters()]
    assert apply_activation_checkpointing(wrapped, mode) == cfg.num_layers
    assert [n for n, _ in wrapped.named_parameters()] == names  # checkpoints keep their keys
    (l0, g0), (l1, g1) = _loss_and_grads(plain, tokens), _loss_and_grads(wrapped, tokens)
    assert torch.allclose(l0, l1, rtol=1e-6, atol=0)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g0, g1))


def test_recomputation_really_recomputes_and_eval_runs_plain():
    cfg = load_config(None, ["model.preset=debug"]).model
    model = build_model(cfg, seed=5)
    apply_activation_checkpointing(model, "full")
    calls = []
    attn = model.blocks[0].attn
    attn.register_forward_hook(lambda *_: calls.append(1))
    tokens = torch.randint(0, cfg.vocab_size, (1, 9))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    assert len(calls) == 2  # forward, then again in backward
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(tokens)
    assert len(calls) == 1


def test_parallelize_rejects_unknown_mode_and_applies_config():
    cfg = load_config(None, ["model.preset=debug", "train.activation_checkpointing=selective"])
    model = build_model(cfg.model, seed=1)
    before = model.blocks[0].forward
    parallelize(model, cfg.train)
    assert model.blocks[0].forward is not before
    with pytest.raises(ValueError, match="activation checkpointing"):
        apply_activation_checkpointing(model, "most")
