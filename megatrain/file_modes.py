"""Files megatrain writes get the permissions the user's umask gives any new file (0644 under the
usual 022), so that others on a shared cluster can read an export or a checkpoint.

safetensors' ``save_file`` creates its file owner-only (0600, like a ``mkstemp`` file), whatever
the umask; everything written through :func:`save_safetensors` is set back to the umask's mode.
"""

from __future__ import annotations

import os
from typing import Any, Optional

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
    """safetensors.torch.save_file, with the umask's file mode instead of 0600."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    apply_default_mode(path)
