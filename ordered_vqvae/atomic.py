"""Writing directories so that a reader never sees a half-written one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_directory(path: str):
    """Yields a fresh temporary directory beside `path`; when the block succeeds it replaces
    `path` (rename), when it fails it is removed and `path` is left as it was."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):  # Two renames: the old one is never deleted in place.
            old = tempfile.mkdtemp(prefix=f".tmp-old-{name}-", dir=parent)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable_directory(path: str, what: str = "directory") -> None:
    """Creates `path` if needed and proves it writable by creating and removing a file:
    permission bits say nothing for root or on read-only mounts. Raises OSError naming it."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OSError(e.errno, f"{what} {path!r} is not writable ({e.strerror})") from None
