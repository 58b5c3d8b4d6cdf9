"""What a tool may write over: never one of its inputs, never something it did not write itself.

Every tool that writes files (preprocess_data, merge_datasets, train_tokenizer, megatrain-convert) runs these
checks before it reads or writes anything large:

- an output is never an input (the same file by path, symlink or hard link), never a directory that holds
  an input (replacing it would delete the input) and never inside an input directory or checkpoint;
- an existing output is replaced only when it carries the mark of an earlier output of the same kind
  (a data sidecar, a SentencePiece model, a converter marker), so a file or directory the user keeps for
  something else is never replaced, whatever the flags.

The checks compare real paths (symlinks resolved), so ``./data/x`` and ``data//x`` and a symlink to it
are the same path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Union

PathLike = Union[str, os.PathLike]


def real(path: PathLike) -> Path:
    """The absolute path with every symlink resolved (the path need not exist)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name one file: equal real paths, or one inode (a hard link)."""
    if real(a) == real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def is_inside(path: PathLike, folder: PathLike) -> bool:
    """True when ``path`` lies strictly below ``folder`` (real paths)."""
    p, f = real(path), real(folder)
    return p != f and f in p.parents


def conflict(output: PathLike, inputs: Iterable[PathLike], inside_dirs: bool = True) -> Optional[str]:
    """How ``output`` collides with one of ``inputs``, as words for an error message, or None.
    ``inside_dirs``: an output below an input directory counts too (a data tool's next run over that
    directory would read its own output back as input)."""
    for inp in inputs:
        if same_file(output, inp):
            return f"is the input {inp}"
        if is_inside(inp, output):
            return f"contains the input {inp} (replacing it would delete the input)"
        if inside_dirs and os.path.isdir(inp) and is_inside(output, inp):
            return (f"lies inside the input directory {inp} (the next run over that directory would read it back "
                    f"as input)")
    return None


def check_not_inputs(outputs: Iterable[tuple[str, PathLike]], inputs: Iterable[PathLike],
                     error: type = ValueError, fix: str = "choose another output path", inside_dirs: bool = True) -> None:
    """Raise ``error`` when any (label, path) output collides with an input."""
    inputs = [i for i in inputs if i is not None]
    for label, out in outputs:
        why = conflict(out, inputs, inside_dirs)
        if why is not None:
            raise error(f"{label} {out}: {why}; {fix}")


def enclosing_checkpoint(path: PathLike, markers: tuple[str, ...]) -> Optional[Path]:
    """The nearest existing folder at or above ``path`` that holds one of ``markers`` (e.g. a checkpoint's
    meta.json / manifest.json), or None."""
    for p in (real(path), *real(path).parents):
        if p.is_dir() and any((p / m).exists() for m in markers):
            return p
    return None
