"""Tokenizer and the tools: train_tokenizer, preprocess_data, merge_datasets, inspect_data."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatrain.data import preprocess as preprocess_module
from megatrain.data.indexed import IndexedDataset, read_sidecar
from megatrain.data.tokenizer import Tokenizer
from tests.data.helpers import make_dataset, random_text, write_jsonl
from tools import inspect_data, merge_datasets, preprocess_data, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _files(prefix: str) -> tuple[bytes, bytes]:
    return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


def _run_pre(corpus, out, tok, *extra) -> int:
    return preprocess_data.main(["--input", *([corpus] if isinstance(corpus, str) else corpus), "--output-prefix",
                                 out, "--tokenizer-model", tok, "--no-progress", *extra])


def test_tokenizer(tiny_tokenizer):
    tok = Tokenizer(tiny_tokenizer)
    assert tok.vocab_size == 300 and (tok.unk_id, tok.bos_id, tok.eos_id, tok.eod_id, tok.pad_id) == (0, 1, 2, 2, -1)
    text = "alpha beta  gamma\n 42 ünïcode ☃"  # ☃ is not in the training text: byte fallback
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("alpha", bos=True, eos=True)[0] == 1 and tok.encode("alpha", eos=True)[-1] == 2
    assert tok.encode_batch(["alpha", "beta"]) == [tok.encode("alpha"), tok.encode("beta")]
    assert len(tok.sha256) == 64 and pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)


def test_train_tokenizer_cli(tmp_path, corpus_jsonl, capsys):
    out = str(tmp_path / "tok")
    assert train_tokenizer.main(["--input", corpus_jsonl, "--vocab-size", "400", "--output-prefix", out,
                                 "--user-defined-symbols", "<|sep|>,<|img|>", "--num-threads", "1"]) == 0
    tok = Tokenizer(out + ".model")
    assert tok.vocab_size == 400 and os.path.exists(out + ".vocab")
    assert len(tok.encode("<|sep|>")) <= 2 and tok.id_to_piece(tok.encode("<|sep|>")[-1]) == "<|sep|>"
    assert "400-entry bpe model" in capsys.readouterr().out


def test_train_tokenizer_without_usable_text_says_so(tmp_path, capsys):
    keyless = write_jsonl(str(tmp_path / "keyless.jsonl"), ["alpha", "beta"], key="body")
    assert train_tokenizer.main(["--input", keyless, "--vocab-size", "300", "--output-prefix",
                                 str(tmp_path / "tok")]) == 1
    assert "no usable text in 2 records of --input (2 without a string under --json-keys text)" in \
        capsys.readouterr().err


def test_preprocess_output_and_summary(tmp_path, corpus_jsonl, tiny_tokenizer, capsys):
    out = str(tmp_path / "one")
    assert _run_pre(corpus_jsonl, out, tiny_tokenizer, "--append-eod") == 0
    summary = capsys.readouterr().out
    assert "300 documents" in summary and "MB/s per worker" in summary and "docs/s" in summary
    ds = IndexedDataset(out, verify="full")
    tok = Tokenizer(tiny_tokenizer)
    texts = [json.loads(line)["text"] for line in open(corpus_jsonl)]
    assert ds.num_documents == 300
    for j in (0, 17, 299):
        assert ds.get_document(j).tolist() == tok.encode(texts[j]) + [tok.eod_id]
    side = read_sidecar(out)
    assert side["tokenizer_sha256"] == tok.sha256 and side["vocab_size"] == 300 and side["eod_id"] == 2
    assert side["sources"][0]["path"].endswith("corpus.jsonl")


def test_workers_do_not_change_the_output(tmp_path, corpus_jsonl, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(preprocess_module, "BATCH_RECORDS", 16)  # many tasks, spread over both workers
    _run_pre(corpus_jsonl, str(tmp_path / "w1"), tiny_tokenizer, "--workers", "1", "--append-eod")
    _run_pre(corpus_jsonl, str(tmp_path / "w2"), tiny_tokenizer, "--workers", "2", "--append-eod")
    assert _files(str(tmp_path / "w1")) == _files(str(tmp_path / "w2"))


def test_partitions_merge_to_the_single_run(tmp_path, corpus_jsonl, tiny_tokenizer):
    rng = random.Random(3)
    second = write_jsonl(str(tmp_path / "second.jsonl"), [random_text(rng, 20) for _ in range(31)])
    inputs = [corpus_jsonl, second]
    _run_pre(inputs, str(tmp_path / "all"), tiny_tokenizer, "--append-eod")
    shards = []
    for i in range(3):
        shards.append(str(tmp_path / f"shard_{i}"))
        assert _run_pre(inputs, shards[-1], tiny_tokenizer, "--append-eod", "--partition", str(i),
                        "--num-partitions", "3") == 0
    assert sum(IndexedDataset(s).num_documents for s in shards) == 331
    assert merge_datasets.main(["--input", *shards, "--output-prefix", str(tmp_path / "merged")]) == 0
    assert _files(str(tmp_path / "all")) == _files(str(tmp_path / "merged"))


def test_gzip_and_plain_text_inputs(tmp_path, corpus_jsonl, tiny_tokenizer):
    gz = str(tmp_path / "corpus.jsonl.gz")
    with open(corpus_jsonl, "rb") as src, gzip.open(gz, "wb") as dst:
        dst.write(src.read())
    _run_pre(corpus_jsonl, str(tmp_path / "plain"), tiny_tokenizer)
    _run_pre(gz, str(tmp_path / "gz"), tiny_tokenizer)
    assert _files(str(tmp_path / "plain")) == _files(str(tmp_path / "gz"))
    txt = tmp_path / "lines.txt"
    txt.write_text("alpha beta\n\ngamma delta\n")
    _run_pre(str(txt), str(tmp_path / "txt"), tiny_tokenizer)
    assert IndexedDataset(str(tmp_path / "txt")).num_documents == 2  # the blank line is an empty document


def test_malformed_lines_are_counted_with_line_numbers(tmp_path, tiny_tokenizer, caplog, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "alpha"}\n{"text": \n{"other": "x"}\n[1, 2]\n{"text": 5}\n\n{"text": "beta"}\n')
    out = str(tmp_path / "bad")
    assert _run_pre(str(path), out, tiny_tokenizer) == 0
    assert IndexedDataset(out).num_documents == 2
    assert "4 malformed" in capsys.readouterr().out
    for lineno, reason in [(2, "bad JSON"), (3, "missing key 'text'"), (4, "not a JSON object"), (5, "key 'text' is int, not a string")]:
        assert f"bad.jsonl:{lineno}: skipped malformed record: {reason}" in caplog.text

    strict = str(tmp_path / "strict")
    assert _run_pre(str(path), strict, tiny_tokenizer, "--strict") == 1
    assert "bad.jsonl:2: bad JSON" in capsys.readouterr().err
    assert not [f for f in os.listdir(tmp_path) if f.startswith("strict")]


def test_unreadable_inputs_fail_naming_the_file_and_write_nothing(tmp_path, tiny_tokenizer, capsys):
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"text": "ok"}\n\xff\xfe\x00garbage\n')  # one good record, one not UTF-8
    assert _run_pre(str(binary), str(tmp_path / "b"), tiny_tokenizer, "--strict") == 1
    assert "binary.jsonl:2: not UTF-8 text" in capsys.readouterr().err
    assert _run_pre(str(binary), str(tmp_path / "b"), tiny_tokenizer) == 0  # skipped and counted, not a crash
    assert "1 malformed" in capsys.readouterr().out

    gz = tmp_path / "broken.jsonl.gz"
    gz.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(64))
    assert _run_pre(str(gz), str(tmp_path / "g"), tiny_tokenizer) == 1
    assert f"--input {gz}: not a readable gzip file" in capsys.readouterr().err

    (tmp_path / "file").write_text("x")
    assert _run_pre(str(binary), str(tmp_path / "file" / "out"), tiny_tokenizer) == 1
    assert f"cannot create the folder {tmp_path / 'file'}" in capsys.readouterr().err

    keyless = write_jsonl(str(tmp_path / "keyless.jsonl"), ["alpha", "beta"], key="body")
    assert _run_pre(keyless, str(tmp_path / "k"), tiny_tokenizer) == 1
    err = capsys.readouterr().err
    assert "no documents to write (2 records read: 2 malformed" in err and "missing key 'text'" in err
    assert not [f for f in os.listdir(tmp_path) if f.startswith(("g.", "k."))]


def test_dedup(tmp_path, tiny_tokenizer, capsys):
    path = write_jsonl(str(tmp_path / "dup.jsonl"), ["alpha beta", "gamma", "alpha beta", "gamma", "delta"])
    assert _run_pre(path, str(tmp_path / "dd"), tiny_tokenizer, "--dedup") == 0
    assert "2 duplicates" in capsys.readouterr().out
    ds = IndexedDataset(str(tmp_path / "dd"))
    tok = Tokenizer(tiny_tokenizer)
    assert [tok.decode(ds.get_document(j).tolist()) for j in range(ds.num_documents)] == ["alpha beta", "gamma", "delta"]


def test_several_json_keys(tmp_path, tiny_tokenizer):
    path = tmp_path / "kv.jsonl"
    path.write_text('{"title": "alpha", "text": "beta gamma"}\n{"title": "delta", "text": "tau"}\n')
    assert _run_pre(str(path), str(tmp_path / "kv"), tiny_tokenizer, "--json-keys", "title", "text") == 0
    assert IndexedDataset(str(tmp_path / "kv_title")).num_documents == 2
    assert IndexedDataset(str(tmp_path / "kv_text")).num_tokens > IndexedDataset(str(tmp_path / "kv_title")).num_tokens


def test_interrupted_in_process_leaves_nothing(tmp_path, corpus_jsonl, tiny_tokenizer, monkeypatch):
    real, calls = preprocess_module._encode_batch, []

    def dying(batch):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(batch)

    monkeypatch.setattr(preprocess_module, "_encode_batch", dying)
    monkeypatch.setattr(preprocess_module, "BATCH_RECORDS", 50)  # several batches: the first one is written
    assert _run_pre(corpus_jsonl, str(tmp_path / "cut"), tiny_tokenizer) == 130
    assert [f for f in os.listdir(tmp_path) if f.startswith("cut")] == []


def test_sigterm_leaves_no_dataset(tmp_path, tiny_tokenizer):
    rng = random.Random(0)
    big = write_jsonl(str(tmp_path / "big.jsonl"), [random_text(rng, 60) for _ in range(60_000)])
    out = str(tmp_path / "sig")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", big,
                             "--output-prefix", out, "--tokenizer-model", tiny_tokenizer, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.time() + 60
    while not any(".partial-" in f for f in os.listdir(tmp_path)) and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be interrupted; use a bigger input"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"interrupted" in err
    assert sorted(os.listdir(tmp_path)) == ["big.jsonl"]


def test_inspect_stats_and_decode(tmp_path, corpus_jsonl, tiny_tokenizer, capsys):
    out = str(tmp_path / "i")
    _run_pre(corpus_jsonl, out, tiny_tokenizer)
    capsys.readouterr()
    assert inspect_data.main(["stats", out]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["documents"] == 300 and stats["document_tokens"]["p0"] <= stats["document_tokens"]["p50"]
    assert stats["tokens"] == IndexedDataset(out).num_tokens
    assert inspect_data.main(["decode", out, "--document", "7", "--tokenizer-model", tiny_tokenizer]) == 0
    assert capsys.readouterr().out.rstrip("\n") == json.loads(open(corpus_jsonl).readlines()[7])["text"]
    assert inspect_data.main(["decode", out, "--document", "300", "--tokenizer-model", tiny_tokenizer]) == 1
    assert inspect_data.main(["decode", out, "--document", "-1", "--tokenizer-model", tiny_tokenizer]) == 1
    assert "--document -1: must be in [0, 300)" in capsys.readouterr().err
    assert inspect_data.main(["verify", out, "--vocab-size", "-5"]) == 1
    assert "--vocab-size -5: must be positive" in capsys.readouterr().err
    assert inspect_data.main(["verify", out, "--vocab-size", "200", "--full"]) == 1  # tokens >= 200 exist
    assert "outside the vocabulary" in capsys.readouterr().err
    assert np.asarray(IndexedDataset(out).tokens).max() >= 200
    from megatrain.data.indexed import IndexedDatasetBuilder

    with IndexedDatasetBuilder(str(tmp_path / "wide"), vocab_size=60000) as b:  # another tokenizer's ids
        b.add_sequence([5, 50000])
        b.end_document()
        b.finalize()
    assert inspect_data.main(["decode", str(tmp_path / "wide"), "--document", "0", "--tokenizer-model",
                              tiny_tokenizer]) == 1
    assert "holds token id 50000, outside" in capsys.readouterr().err
    assert inspect_data.main(["decode", str(tmp_path / "wide"), "--document", "0", "--ids", "--tokenizer-model",
                              tiny_tokenizer]) == 0
    assert capsys.readouterr().out.split() == ["5", "50000"]


def _read_a_little_then_close(cmd: list[str]) -> tuple[int, str]:
    """Run ``cmd`` like ``cmd | head -c 100``: read a little of its stdout, close the pipe, wait."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.read(100)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    return proc.wait(timeout=120), err


@pytest.mark.parametrize("what", ["decode", "ids", "train-help-config"])
def test_tools_stop_quietly_when_the_reader_goes(tmp_path, tiny_tokenizer, what):
    # `inspect_data decode ... | head` ended in a BrokenPipeError traceback (and another at exit)
    import sys

    from megatrain.data.tokenizer import Tokenizer

    big = [Tokenizer(tiny_tokenizer).encode(" ".join(["alpha beta gamma delta"] * 40_000))]  # > the pipe buffer
    prefix = make_dataset(str(tmp_path / "big"), big, vocab_size=Tokenizer(tiny_tokenizer).vocab_size)
    if what == "train-help-config":
        cmd = [sys.executable, "-c", "import sys; from megatrain.telemetry.logs import setup_logging; "
               "from megatrain.train import main; import logging; setup_logging(); "
               "[logging.getLogger('megatrain.x').info('line %d of a long log', i) for i in range(20000)]; "
               "sys.exit(main(['--help-config']))"]
    else:
        cmd = [sys.executable, "tools/inspect_data.py", "decode", prefix, "--document", "0", "--tokenizer-model",
               tiny_tokenizer] + (["--ids"] if what == "ids" else [])
    code, err = _read_a_little_then_close(cmd)
    assert "Traceback" not in err and "BrokenPipe" not in err and "Logging error" not in err, err
    # the tool ends with SIGPIPE's status; a log stream that lost its reader goes quiet and the run goes on
    assert code == (0 if what == "train-help-config" else 141), (code, err)
