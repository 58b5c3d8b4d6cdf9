"""Sampling never draws an id the tokenizer lacks (issue 16, class 1: a padded vocabulary)."""

import torch

from megatrain.model.generate import generate


class PaddedRowsWin(torch.nn.Module):
    """Logits over 64 ids (a vocabulary padded from 50) where the padding rows score highest, as untrained
    rows can after a few steps."""

    def forward(self, ids):  # (B, T) -> (B, T, V)
        logits = torch.zeros(*ids.shape, 64)
        logits[..., 50:] = 10.0
        logits[..., 7] = 5.0
        return logits


def test_padded_vocabulary_ids_are_never_drawn():
    model = PaddedRowsWin()
    assert generate(model, [1], 4, 16, torch.device("cpu"))[0] >= 50  # unmasked: an id with no piece
    for top_p in (0.0, 0.9, 1.0):
        out = generate(model, [1, 2], 8, 16, torch.device("cpu"), top_p=top_p, temperature=2.0, vocab_limit=50)
        assert out and max(out) < 50
    assert set(generate(model, [1], 3, 16, torch.device("cpu"), vocab_limit=50)) == {7}
