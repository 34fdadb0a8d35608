"""The one atomic writer: everything the project publishes appears whole or not at all.

Files and directories are written under a temporary name beside their final one and then
renamed into place; an existing directory is moved aside first, never deleted in place, so
a failure at any point leaves the previous version readable. Paths may be local or
`tf.io.gfile` URLs (gs://, s3://, ...): object stores have no directory rename, so there a
directory is copied file by file and then the staging copy is removed.

This is the only module that renames (`os.replace`, `tf.io.gfile.rename`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid


def is_url(path: str) -> bool:
    """Whether `path` names an object-store location (`scheme://...`) rather than a local one."""
    return "://" in str(path)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w"):
    """Yields a file object open for writing (`mode` "w" or "wb"); when the block succeeds the
    file is renamed to `path`, when it fails the partial file is removed."""
    path = str(path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    if is_url(path):
        import tensorflow as tf

        opener, rename, remove = tf.io.gfile.GFile, lambda a, b: tf.io.gfile.rename(
            a, b, overwrite=True), tf.io.gfile.remove
        exists = tf.io.gfile.exists
    else:
        opener, rename, remove, exists = open, os.replace, os.remove, os.path.exists
    try:
        with opener(tmp, mode) as f:
            yield f
        rename(tmp, path)
    except BaseException:
        if exists(tmp):
            remove(tmp)
        raise


def write_json(path: str, value, **dump_options) -> None:
    """Writes `value` as indented, key-sorted JSON to `path` atomically."""
    with atomic_file(path, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True, default=str, **dump_options)


def _swap_into_place(tmp: str, path: str) -> None:
    """Renames the finished directory `tmp` to `path`; an existing `path` is moved aside
    first and removed only once the new one is in place."""
    parent, name = os.path.dirname(path), os.path.basename(path)
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".tmp-old-{name}-", dir=parent)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(path: str):
    """Yields a fresh local temporary directory beside `path`; when the block succeeds it
    replaces `path`, when it fails it is removed and `path` is left as it was."""
    path = os.path.abspath(path)
    parent, name = os.path.dirname(path), os.path.basename(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
    try:
        yield tmp
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_directory(staging: str, output: str) -> None:
    """Moves a finished staging directory (beside `output`, local or gfile) to `output`,
    replacing what was there."""
    if not is_url(output):
        _swap_into_place(os.path.abspath(staging), os.path.abspath(output))
        return
    import tensorflow as tf

    tf.io.gfile.makedirs(output)
    for name in tf.io.gfile.listdir(staging):
        tf.io.gfile.copy(os.path.join(staging, name), os.path.join(output, name), overwrite=True)
    tf.io.gfile.rmtree(staging)


def publish_version(source: str, base_path: str) -> int:
    """Copies the directory `source` into `base_path` as the next version, `<n>/` with n one
    more than the highest integer-named entry, and returns n. The copy is made under a
    temporary name and renamed, so a server polling the base path never sees a partial
    version; two publishers racing for one number both succeed, with different numbers."""
    if is_url(base_path):
        raise ValueError(f"model_base_path={base_path!r}: versions are published by rename, "
                         "which object stores lack; publish to a local or mounted directory")
    os.makedirs(base_path, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-version-", dir=base_path)
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        while True:
            taken = [int(n) for n in os.listdir(base_path) if n.isdigit()]
            version = max(taken, default=0) + 1
            try:
                os.rename(tmp, os.path.join(base_path, str(version)))  # Never replaces.
                return version
            except OSError:
                if not os.path.exists(os.path.join(base_path, str(version))):
                    raise
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
