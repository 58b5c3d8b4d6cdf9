"""The built-in demo corpus: documentation that ships with every Python, so the quickstart needs no download.

Documents are the ``pydoc_data.topics`` help texts and, per standard-library module, its docstrings (read
with ``ast`` from the source files, never imported: importing e.g. ``antigravity`` has side effects).
:func:`prepare_demo` writes the JSONL corpus, trains a 4096-entry SentencePiece BPE tokenizer (the demo
preset's vocabulary) and preprocesses the corpus, all cached under ``cache_dir``.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import sys
import sysconfig
import time

from megatrain.data.gpt_dataset import file_lock
from megatrain.data.indexed import write_json_atomic

logger = logging.getLogger(__name__)

DEMO_VOCAB_SIZE = 4096
DEMO_VERSION = 1
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__", "turtledemo",
              "ensurepip", "tkinter", "pydoc_data"}
_TOKENIZER_LINES = 200_000  # far more than the corpus has: sampling only kicks in on a bigger stdlib


def _module_document(path: str, name: str) -> str:
    """The docstrings of one module (module, classes, functions), as one document."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, ValueError, OSError):
        return ""
    parts = []
    for node in [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef,
                                                                       ast.AsyncFunctionDef))]:
        doc = ast.get_docstring(node)
        if doc and len(doc) >= 40:
            title = name if isinstance(node, ast.Module) else f"{name}.{node.name}"
            parts.append(f"{title}\n\n{doc.strip()}")
    return "\n\n".join(parts)


def iter_demo_documents():
    """(source, text) for every demo document, in a fixed order."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield f"pydoc_data.topics:{key}", topics[key].strip()
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith((".", "config-")))
        rel = os.path.relpath(dirpath, root)
        for fname in sorted(files):
            if not fname.endswith(".py"):
                continue
            mod = fname[:-3] if rel == "." else rel.replace(os.sep, ".") + "." + fname[:-3]
            text = _module_document(os.path.join(dirpath, fname), mod.removesuffix(".__init__"))
            if text:
                yield f"stdlib:{mod}", text


def write_demo_corpus(path: str) -> int:
    """Write the corpus as JSONL ({"text", "source"}); returns the number of documents."""
    tmp = f"{path}.partial-{os.getpid()}"
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for source, text in iter_demo_documents():
            if text:
                f.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
                n += 1
    os.replace(tmp, path)
    return n


def _is_done(cache_dir: str) -> bool:
    marker = os.path.join(cache_dir, "demo.done.json")
    if not os.path.exists(marker):
        return False
    try:
        with open(marker) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    return info.get("version") == DEMO_VERSION and all(os.path.exists(os.path.join(cache_dir, p))
                                                         for p in ("demo.bin", "demo.idx", "tokenizer.model"))


def prepare_demo(cache_dir: str) -> tuple[str, str]:
    """(dataset prefix, tokenizer .model path) of the demo corpus, built on first use and cached.

    Several processes may call it at once (e.g. every rank of a job): one builds under a file lock, the
    others wait and then read the cached result.
    """
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    prefix, model = os.path.join(cache_dir, "demo"), os.path.join(cache_dir, "tokenizer.model")
    if _is_done(cache_dir):
        return prefix, model
    os.makedirs(cache_dir, exist_ok=True)
    with file_lock(os.path.join(cache_dir, "demo.lock")):
        if not _is_done(cache_dir):
            _build_demo(cache_dir, prefix)
    return prefix, model


def _build_demo(cache_dir: str, prefix: str) -> None:
    from megatrain.data.preprocess import PreprocessOptions, preprocess
    from megatrain.data.tokenizer import train_tokenizer

    start = time.perf_counter()
    corpus = os.path.join(cache_dir, "corpus.jsonl")
    num_docs = write_demo_corpus(corpus)

    def texts():
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    model = train_tokenizer(texts(), DEMO_VOCAB_SIZE, os.path.join(cache_dir, "tokenizer"),
                            input_sentence_size=_TOKENIZER_LINES, num_threads=min(4, os.cpu_count() or 1))
    result = preprocess(PreprocessOptions(inputs=[corpus], output_prefix=prefix, tokenizer_model=model,
                                          workers=1, append_eod=True, progress=False))
    write_json_atomic(os.path.join(cache_dir, "demo.done.json"), {
        "version": DEMO_VERSION, "python": sys.version.split()[0], "documents": num_docs,
        "tokens": result.tokens, "seconds": round(time.perf_counter() - start, 1)})
    logger.info("demo corpus: %d documents, %d tokens, built in %.1f s in %s", result.documents, result.tokens,
                time.perf_counter() - start, cache_dir)
