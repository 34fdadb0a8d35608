"""Training examples on disk with random access, so that training memory does not grow with
the dataset.

`write_examples` streams batches of fixed-shape examples (images, code sequences) into one
`.npy` file, NumPy's own format (`np.load(path, mmap_mode="r")` reads it too), written
atomically. `ExampleFile` reads any set of rows back with positioned reads: memory holds
the rows asked for, never the file. The training stream (`ordered_vqvae.fit.TrainingData`)
draws each batch's rows from a seeded permutation of the indices, so a file gives the same
batches as the same examples held in memory, and resume stays exact.

The file is as large as the examples in their dtype (float32 images: 4 bytes per value;
64x64 RGB CelebA, 202,599 images: 10 GB of disk), read at random: a local disk is assumed.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import numpy as np

from ordered_vqvae.atomic import atomic_file

_MAGIC = b"\x93NUMPY\x01\x00"
_HEADER_BYTES = 256  # The whole header, padded: rewritten in place once the count is known.


def _header(dtype: np.dtype, shape: Sequence[int]) -> bytes:
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                 "shape": tuple(int(s) for s in shape)})
    length = _HEADER_BYTES - len(_MAGIC) - 2
    if len(text) + 1 > length:
        raise ValueError(f"example shape {tuple(shape)} is too long for the file header")
    return _MAGIC + length.to_bytes(2, "little") + (text.ljust(length - 1) + "\n").encode()


def write_examples(path: str, batches: Iterable[np.ndarray], dtype,
                   limit: Optional[int] = None) -> "ExampleFile":
    """Writes the rows of `batches` (arrays [B, ...] of one shape) as `dtype` to `path`
    (the first `limit` rows when given); returns the file opened for reading. Nothing
    appears under `path` unless every batch was written."""
    dtype = np.dtype(dtype)
    count, shape = 0, None
    with atomic_file(path, "wb") as f:
        f.write(_header(dtype, (0,)))
        for batch in batches:
            batch = np.asarray(batch)
            if limit is not None:
                batch = batch[:max(limit - count, 0)]
            if shape is None:
                shape = batch.shape[1:]
            elif batch.shape[1:] != shape:
                raise ValueError(f"a batch of examples has shape {batch.shape[1:]}, expected "
                                 f"{shape} like the first")
            f.write(np.ascontiguousarray(batch, dtype).tobytes())
            count += len(batch)
            if limit is not None and count >= limit:
                break
        if not count:
            raise ValueError(f"no examples to write to {path!r}")
        f.seek(0)
        f.write(_header(dtype, (count,) + shape))
    return ExampleFile(path)


class ExampleFile:
    """Rows of a `.npy` file read on demand. Picklable (it reopens the file), so tf.data and
    worker processes can hold one."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version != (1, 0):
                raise ValueError(f"{path!r} is a .npy file of version {version}, expected 1.0")
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            self.offset = f.tell()
        if fortran or not shape:
            raise ValueError(f"{path!r} holds a {'Fortran-ordered ' if fortran else ''}array "
                             f"of shape {shape}, expected C-ordered rows")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        expected = self.offset + shape[0] * self.row_bytes
        if os.path.getsize(path) != expected:
            raise ValueError(f"{path!r} holds {os.path.getsize(path)} bytes, expected {expected} "
                             f"for {shape[0]} rows of shape {shape[1:]}: it is truncated")
        self._fd = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_fd"} | {"_fd": None}

    def read(self, indices) -> np.ndarray:
        """The rows at `indices` (any order, repeats allowed), as [len(indices), ...]."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        indices = np.asarray(indices, np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"rows {indices.min()}..{indices.max()} of {self.path!r}, which "
                             f"holds {len(self)}")
        out = bytearray(len(indices) * self.row_bytes)
        view, size = memoryview(out), self.row_bytes
        for j, i in enumerate(indices):
            view[j * size:(j + 1) * size] = os.pread(self._fd, size, self.offset + int(i) * size)
        return np.frombuffer(out, self.dtype).reshape((len(indices),) + self.shape[1:])

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

