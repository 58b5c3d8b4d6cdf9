"""Issue 16, class 2 for the data tools: an output is never an input, never inside an input directory, and
replaces only an earlier megatrain output; every refusal is exit 1 with one line and leaves every file as it was."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from tests.data.helpers import make_dataset, write_jsonl
from tools import merge_datasets, preprocess_data, train_tokenizer


def _snapshot(root) -> dict:
    return {os.path.relpath(os.path.join(d, n), root): hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
            for d, _, names in os.walk(root) for n in names}


def _pre(inputs, prefix, tok, *extra) -> int:
    return preprocess_data.main(["--input", *inputs, "--output-prefix", prefix, "--tokenizer-model", tok,
                                 "--no-progress", *extra])


@pytest.fixture
def corpus_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(str(d / "X.json"), ["alpha beta gamma"] * 20)
    (d / "notes.txt").write_text("delta epsilon\nzeta eta\n")
    return d


@pytest.mark.parametrize("case,needle", [
    ("X.json -> X", "is the input"),                     # the sidecar X.json would replace the corpus
    ("X.json -> X, via ./", "is the input"),
    ("symlink", "is the input"),
    ("hard link", "is the input"),
    ("notes.txt -> notes.txt (.bin/.idx/.json of 'notes.txt' prefix is not the input, but the dir is)",
     "lies inside the input directory"),
    ("dir input, output inside", "lies inside the input directory"),
    ("the tokenizer model", "is the input"),
    ("a JSON file that is not a sidecar", "is not a megatrain dataset sidecar"),
    ("a .bin/.idx without sidecar", "exist without a megatrain sidecar"),
    ("a directory at PREFIX.bin", "is a directory"),
])
def test_preprocess_refuses_outputs_over_inputs(tmp_path, corpus_dir, tiny_tokenizer, capsys, case, needle):
    x = corpus_dir / "X.json"
    tok = tmp_path / "tok.model"
    shutil.copy(tiny_tokenizer, tok)
    inputs, prefix = [str(x)], str(corpus_dir / "X")
    if case.startswith("X.json -> X, via"):
        prefix = str(corpus_dir) + "/./X"
    elif case == "symlink":
        os.symlink(x, tmp_path / "link.json")
        prefix = str(tmp_path / "link")
    elif case == "hard link":
        os.link(x, tmp_path / "hard.json")
        prefix = str(tmp_path / "hard")
    elif case.startswith("notes.txt"):
        inputs, prefix = [str(corpus_dir)], str(corpus_dir / "notes")
    elif case.startswith("dir input"):
        inputs, prefix = [str(corpus_dir)], str(corpus_dir / "sub" / "ds")
    elif case == "the tokenizer model":
        shutil.copy(tiny_tokenizer, tmp_path / "tk.json")  # a tokenizer named .json, prefix tk
        tok, prefix = tmp_path / "tk.json", str(tmp_path / "tk")
    elif case == "a JSON file that is not a sidecar":
        (tmp_path / "cfg.json").write_text('{"lr": 1}')
        prefix = str(tmp_path / "cfg")
    elif case == "a .bin/.idx without sidecar":
        made = make_dataset(str(tmp_path / "kept"), [[1, 2, 3]])
        os.remove(made + ".json")
        prefix = made
    elif case == "a directory at PREFIX.bin":
        (tmp_path / "d.bin").mkdir()
        prefix = str(tmp_path / "d")
    before = _snapshot(tmp_path)
    assert _pre(inputs, prefix, str(tok)) == 1
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert _snapshot(tmp_path) == before


def test_preprocess_replaces_its_own_earlier_output(tmp_path, corpus_dir, tiny_tokenizer, capsys):
    out = str(tmp_path / "out" / "ds")
    assert _pre([str(corpus_dir / "X.json")], out, tiny_tokenizer) == 0
    first = _snapshot(tmp_path / "out")
    assert _pre([str(corpus_dir / "X.json"), str(corpus_dir / "notes.txt")], out, tiny_tokenizer) == 0
    assert _snapshot(tmp_path / "out") != first  # replaced: the sidecar says megatrain wrote it


def test_binary_text_file_is_refused(tmp_path, tiny_tokenizer, capsys):
    blob = tmp_path / "model.txt"
    blob.write_bytes(bytes(range(256)) * 64)  # e.g. a checkpoint given as .txt
    assert _pre([str(blob)], str(tmp_path / "o"), tiny_tokenizer) == 1
    assert "not a text file (a NUL byte at byte 0" in capsys.readouterr().err
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 ol\xe9\n".encode("latin-1") + b"plain line\n")
    assert _pre([str(latin)], str(tmp_path / "o"), tiny_tokenizer) == 0  # the bad line is a counted malformed record
    assert "1 malformed skipped" in capsys.readouterr().out
    assert not (tmp_path / "o.bin").read_bytes().count(b"\xfd\xff")  # no U+FFFD pieces were written


def test_merge_refuses_outputs_over_inputs(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    a = make_dataset(str(shards / "a"), [[1, 2]])
    b = make_dataset(str(shards / "b"), [[3]])
    before = _snapshot(tmp_path)
    for prefix, needle in ((str(shards) + "/./a", "is the input"), (str(shards / "m"), "inside the input directory"),
                           (a + ".idx", "is the input")):
        args = ["--input", str(shards) if "m" in os.path.basename(prefix) else a, b, "--output-prefix", prefix]
        assert merge_datasets.main(args) == 1
        assert needle in capsys.readouterr().err
        assert _snapshot(tmp_path) == before


def test_merge_does_not_label_a_shard_without_sidecar(tmp_path):
    from megatrain.data.indexed import merge_datasets as merge, read_sidecar

    a = make_dataset(str(tmp_path / "a"), [[1, 2]], tokenizer_sha256="a" * 64)
    other = make_dataset(str(tmp_path / "other"), [[3, 4]])  # ids in range, but from who knows which tokenizer
    os.remove(other + ".json")
    for order in ([a, other], [other, a]):
        side = merge(order, str(tmp_path / "m"))
        assert side["tokenizer_sha256"] is None
        assert read_sidecar(str(tmp_path / "m"))["tokenizer_sha256"] is None
    b = make_dataset(str(tmp_path / "b"), [[5]], tokenizer_sha256="a" * 64)
    assert merge([a, b], str(tmp_path / "m"))["tokenizer_sha256"] == "a" * 64


@pytest.mark.parametrize("args,needle", [
    (["--vocab-size", "0"], "--vocab-size 0: too small"),
    (["--vocab-size", "1"], "--vocab-size 1: too small"),
    (["--vocab-size", "-5"], "--vocab-size -5: too small"),
    (["--vocab-size", "10", "--no-byte-fallback"], "the text's characters and the special pieces need"),
    (["--vocab-size", "2000000000"], "meant for vocabularies up to"),
    (["--vocab-size", "300", "--character-coverage", "0"], "--character-coverage 0.0: must be in (0, 1]"),
    (["--vocab-size", "300", "--character-coverage", "1.5"], "--character-coverage 1.5"),
    (["--vocab-size", "300", "--input-sentence-size", "-1"], "--input-sentence-size -1"),
    (["--vocab-size", "300", "--num-threads", "0"], "--num-threads 0"),
])
def test_train_tokenizer_bad_numbers(tmp_path, corpus_jsonl, capsys, args, needle):
    assert train_tokenizer.main(["--input", corpus_jsonl, "--output-prefix", str(tmp_path / "t"), *args]) == 1
    err = capsys.readouterr().err
    assert needle in err and "INTERNAL" not in err, err
    assert not list(tmp_path.iterdir())


def test_train_tokenizer_outputs(tmp_path, corpus_jsonl, tiny_tokenizer, capsys):
    vocab_input = tmp_path / "words.vocab"
    vocab_input.write_text("alpha beta gamma\n" * 50)
    (tmp_path / "keep.model").write_text("my notes")
    cases = [([str(vocab_input)], str(tmp_path / "words"), "is the input"),
             ([corpus_jsonl], str(tmp_path / "keep"), "is not a SentencePiece model")]
    before = _snapshot(tmp_path)
    for inputs, prefix, needle in cases:
        assert train_tokenizer.main(["--input", *inputs, "--vocab-size", "300", "--output-prefix", prefix,
                                     "--num-threads", "1"]) == 1
        assert needle in capsys.readouterr().err
        assert _snapshot(tmp_path) == before
    # an earlier tokenizer at the prefix is replaced
    shutil.copy(tiny_tokenizer, tmp_path / "tok.model")
    assert train_tokenizer.main(["--input", corpus_jsonl, "--vocab-size", "300", "--output-prefix",
                                 str(tmp_path / "tok"), "--num-threads", "1"]) == 0


def test_swapped_idx_of_the_same_size_is_refused(tmp_path):
    from megatrain.data.indexed import DataFormatError, IndexedDataset

    a = make_dataset(str(tmp_path / "a"), [[1, 2], [3, 4, 5]])
    b = make_dataset(str(tmp_path / "b"), [[1, 2, 3], [4, 5]])  # same counts, other boundaries
    assert os.path.getsize(a + ".idx") == os.path.getsize(b + ".idx")
    shutil.copy(b + ".idx", a + ".idx")
    with pytest.raises(DataFormatError, match=r"idx_sha256: .*a\.idx does not match"):
        IndexedDataset(a)  # verify=sizes, the default
