"""The decoding loop: ids past the tokenizer are never drawn, greedy is the arg-max, streamed text
is the decoded text."""

from __future__ import annotations

import torch

from megatrain.model.generate import Sampling, TextStream, generate, generate_rows, pick


def test_padded_ids_are_never_drawn():
    # model.vocab_size padded to 512 past a 300-piece tokenizer: the padded rows get the largest logits
    logits = torch.zeros(512)
    logits[300:] = 50.0
    logits[7] = 5.0
    gen = torch.Generator().manual_seed(0)
    assert pick(logits, Sampling(1, top_p=0.0, vocab_limit=300), gen) == 7
    draws = {pick(logits, Sampling(1, temperature=1.0, top_p=1.0, vocab_limit=300), gen) for _ in range(200)}
    assert max(draws) < 300
    assert pick(logits, Sampling(1, top_p=0.0), gen) >= 300  # without the limit the padded id wins


def test_generate_rows_stops_at_eos_and_reports_each_token():
    script = {(): 5, (5,): 6, (5, 6): 2}  # continuation of prompt [1]: 5, 6, then eos (2)

    def next_logits(rows):
        out = torch.zeros(len(rows), 10)
        for i, r in enumerate(rows):
            out[i, script.get(tuple(r[1:]), 9)] = 1.0
        return out

    seen = []
    got = generate_rows(next_logits, [[1], [1]], Sampling(8, top_p=0.0, eos_id=2),
                        on_token=lambda row, t: seen.append((row, t)))
    assert got == [[5, 6, 2], [5, 6, 2]]
    assert seen == [(0, 5), (1, 5), (0, 6), (1, 6), (0, 2), (1, 2)]


def test_text_stream_equals_the_decoded_text(tmp_path):
    from tests.convert.conftest import train_tiny_tokenizer
    from megatrain.data.tokenizer import Tokenizer

    tok = Tokenizer(str(train_tiny_tokenizer(tmp_path / "t", 300)))
    text = "Kalo miten — naïve café 漢字 qu ex"  # byte-fallback pieces: a character spans several ids
    ids = tok.encode(text)
    stream = TextStream(tok.decode)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert len([p for p in pieces if p]) > 3  # it did stream


class PaddedRowsWin(torch.nn.Module):
    """Logits over 64 ids (a vocabulary padded from 50) where the padding rows score highest, as untrained
    rows can after a few steps."""

    def forward(self, ids):  # (B, T) -> (B, T, V)
        logits = torch.zeros(*ids.shape, 64)
        logits[..., 50:] = 10.0
        logits[..., 7] = 5.0
        return logits


def test_generate_with_a_model_never_draws_padded_ids():
    model = PaddedRowsWin()
    assert generate(model, [1], 4, 16, torch.device("cpu"))[0] >= 50  # unmasked: an id with no piece
    for top_p in (0.0, 0.9, 1.0):
        out = generate(model, [1, 2], 8, 16, torch.device("cpu"), top_p=top_p, temperature=2.0, vocab_limit=50)
        assert out and max(out) < 50
    assert set(generate(model, [1], 3, 16, torch.device("cpu"), vocab_limit=50)) == {7}
