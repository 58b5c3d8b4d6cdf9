"""SentencePiece tokenizer (LLaMA-style) and its training.

The tokenizer's identity is the sha256 of its .model file; preprocessing records it in the dataset sidecar
and training refuses a dataset tokenized with a different model.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from typing import Iterable, Iterator, Optional, Sequence

from megatrain.data.indexed import DataFormatError, ensure_parent_dir
from megatrain.files import atomic_write_bytes

logger = logging.getLogger(__name__)


class Tokenizer:
    """A SentencePiece model. ``eod_id`` (end of document) is the EOS id, as in Megatron's LLaMA tokenizers."""

    def __init__(self, model_path: str):
        import sentencepiece as spm

        self.model_path = str(model_path)
        if not os.path.isfile(self.model_path):
            raise DataFormatError(f"{self.model_path}: no such tokenizer model file; check data.tokenizer / "
                                  f"--tokenizer-model or train one with tools/train_tokenizer.py")
        with open(self.model_path, "rb") as f:
            blob = f.read()
        self.sha256 = hashlib.sha256(blob).hexdigest()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(blob)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError depending on the version
            raise DataFormatError(f"{self.model_path}: not a SentencePiece model ({e}); pass the .model file "
                                  f"written by tools/train_tokenizer.py or shipped with the model") from None

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def eod_id(self) -> int:
        return self.eos_id

    @property
    def pad_id(self) -> int:
        """The model's pad id; -1 when it has none (LLaMA's models have none: packed pretraining needs none)."""
        return int(self._sp.pad_id())

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._sp.encode(text, out_type=int)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"])

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


def _lines_of(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    # SentencePiece trains on "sentences"; lines of a document are the natural unit, and overlong
    # ones would be dropped by the trainer anyway, so cut them at a character boundary here.
    for text in texts:
        for line in text.split("\n"):
            line = line.strip()
            if line:
                yield line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def train_tokenizer(texts: Iterable[str], vocab_size: int, output_prefix: str, *,
                    model_type: str = "bpe", byte_fallback: bool = True, character_coverage: float = 0.9995,
                    input_sentence_size: int = 2_000_000, user_defined_symbols: Optional[list[str]] = None,
                    num_threads: Optional[int] = None, max_sentence_length: int = 4192) -> str:
    """Train a SentencePiece model (LLaMA ids: unk 0, bos 1, eos 2, no pad) and write OUTPUT.model/.vocab.

    ``input_sentence_size`` lines are sampled (uniformly, by SentencePiece) when the input has more.
    Returns the path of the .model file, written under a temporary name and renamed.
    """
    import sentencepiece as spm

    ensure_parent_dir(output_prefix)  # before the training, not after it
    model = io.BytesIO()
    kwargs = dict(
        sentence_iterator=_lines_of(texts, max_sentence_length), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=byte_fallback, character_coverage=character_coverage,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True, max_sentence_length=max_sentence_length,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", train_extremely_large_corpus=False,
        num_threads=num_threads or os.cpu_count() or 1, minloglevel=2,
    )
    if user_defined_symbols:
        kwargs["user_defined_symbols"] = list(user_defined_symbols)
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed for {output_prefix}.model: {e}") from None
    model_path = output_prefix + ".model"
    _write_atomic(model_path, model.getvalue())
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size()))
    _write_atomic(output_prefix + ".vocab", vocab.encode("utf-8"))
    return model_path


def _write_atomic(path: str, data: bytes) -> None:
    atomic_write_bytes(path, data)
