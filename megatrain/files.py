"""Writing files so that a crash leaves the old version or the new one, never half of either;
and hashing them.

One home for what data preprocessing, checkpoints and conversion all need:

- :func:`atomic_write_bytes` / :func:`atomic_write_json` / :func:`atomic_path`: write under a
  temporary name in the same directory, fsync the data, rename over the target, fsync the parent
  directory (so that the rename itself survives a power cut).
- :func:`fsync_dir`, :func:`replace_dir`: the same promise for whole directories.
- :func:`sha256_file` / :func:`sha256_files` / :func:`file_entry`: content hashes (threads
  overlap reading and hashing of large files: hashlib releases the GIL on big buffers).
- :func:`file_in_the_way`: a regular file that would stop a directory from being created.
- :func:`check_not_inputs` / :func:`conflict`: an output that is, holds or sits in an input.
- :func:`save_safetensors`: safetensors' writer, with the umask's file mode (its own is 0600, so
  others on a shared cluster could not read an export or a checkpoint).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]
_BLOCK = 1 << 22


def fsync_dir(path: PathLike) -> None:
    """Persist a directory's entries (renames, new files). Some file systems refuse to open or fsync a
    directory; the renames stay atomic there, only their durability is the file system's."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_name(path: PathLike) -> Path:
    """A hidden temporary sibling of ``path``, unique to this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to (by any writer: numpy, safetensors,
    torch.save); on success it is fsynced and renamed over ``path``, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes, fsync: bool = True) -> None:
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: PathLike, obj: Any, fsync: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", fsync=fsync)


def replace_dir(tmp: PathLike, final: PathLike) -> None:
    """Move a finished directory into place; an existing one is moved aside first and removed after."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def file_in_the_way(path: PathLike) -> Optional[Path]:
    """The regular file at ``path`` or at its nearest existing ancestor, which would stop ``path`` from
    being created as a directory; None when nothing is in the way."""
    path = Path(path).absolute()
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def sha256_file(path: PathLike, fsync: bool = False) -> str:
    """Hex SHA-256 of a file's content; ``fsync`` also flushes it to disk on the way (a rename that
    publishes it must not overtake its data on a crash)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def file_entry(path: PathLike, fsync: bool = False) -> dict:
    """A manifest entry: ``{"size", "sha256"}``."""
    digest = sha256_file(path, fsync=fsync)
    return {"size": Path(path).stat().st_size, "sha256": digest}


def sha256_files(paths: list[PathLike], fsync: bool = False) -> list[str]:
    """SHA-256 of many files, in order, several at a time."""
    if len(paths) <= 1:
        return [sha256_file(p, fsync) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda p: sha256_file(p, fsync), paths))


# --------------------------------------------------------------------------- outputs never overwrite inputs
#
# Every tool that writes files (preprocess_data, merge_datasets, train_tokenizer, megatrain-convert) runs these
# checks before it reads or writes anything large: an output is never an input (the same file by path, symlink
# or hard link), never a directory that holds an input (replacing it would delete the input) and never inside an
# input directory or checkpoint. Each tool also replaces an existing output only when it carries the mark of an
# earlier output of its own (a data sidecar, a SentencePiece model, a converter marker). Real paths are compared
# (symlinks resolved), so ./data/x, data//x and a symlink to it are one path.


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
                     error: type = ValueError, fix: str = "choose another output path",
                     inside_dirs: bool = True) -> None:
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
# --------------------------------------------------------------------------- file modes

# Read once at import (os.umask can only be read by setting it; doing that later could race with the
# threads of an asynchronous checkpoint save).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def default_file_mode() -> int:
    """What open() would give a new regular file under this process's umask."""
    return 0o666 & ~_UMASK


def apply_default_mode(path: Any) -> None:
    os.chmod(path, default_file_mode())


def save_safetensors(tensors: dict, path: Any, metadata: Optional[dict] = None) -> None:
    """safetensors.torch.save_file, with the umask's file mode instead of the 0600 it creates files with."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    apply_default_mode(path)
