"""How the extraction job reads a source, in pieces its runner spreads over the workers.

An `IndexedSource` is read in index ranges of up to `RANGE_SIZE` examples (any worker
reads any range), or, when only a sequential read reaches its rows (a gzipped IDX file),
as one stream whose batches the reading worker encodes itself: a Reshuffle after it would
hold every decoded image at once on a local runner. A `FileSource` is read one file each
(`fileio.ReadMatches`), or, in a tarball (a gzip stream without random access), by one
worker followed by a Reshuffle that spreads the decoding. Batches are
{"ids", "labels", "images"}; file records are {"id", "label", "encoded"}.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.metrics import Metrics

NAMESPACE = "ovqvae.extract"
RANGE_SIZE = 2048  # Examples per index range,
RANGE_BYTES = 16 * 2**20  # and fewer when their float32 images would exceed this.


def record(record_id: str, label: int, **payload) -> dict:
    return {"id": record_id, "label": int(label), **payload}


def batch(ids: Sequence[str], labels, images) -> dict:
    """The element that flows from reading to writing: a batch of decoded records."""
    return {"ids": list(ids), "labels": np.asarray(labels, np.int64),
            "images": np.asarray(images, np.float32)}


def pick(rows_of: dict, rows) -> dict:
    rows = np.asarray(rows, np.int64)
    return batch([rows_of["ids"][r] for r in rows], rows_of["labels"][rows],
                 rows_of["images"][rows])


def range_rows(image_shape: Sequence[int]) -> int:
    """Examples per index range for images of `image_shape`."""
    return max(1, min(RANGE_SIZE, RANGE_BYTES // (4 * int(np.prod(image_shape)))))


class _ReadRange(beam.DoFn):
    """Reads one index range of an indexed source: one batch."""

    def __init__(self, source, where, split: str):
        self.source, self.where, self.split = source, where, split
        self.read = Metrics.counter(NAMESPACE, "records_read")

    def process(self, piece):
        """piece: (start, stop, the indices to keep in start..stop-1 or None for all)."""
        start, stop, picks = piece
        images, labels, ids = self.source.rows(self.split, self.where, start, stop)
        out = batch(ids, labels, images)
        if picks is not None:
            out = pick(out, np.asarray(picks) - start)
        self.read.inc(len(out["ids"]))
        yield out


class _ReadChunks(beam.DoFn):
    """Streams an indexed source that only reads sequentially, a batch of `rows` at a time
    (of the examples at `indices` only, when given)."""

    def __init__(self, source, where, split: str, rows: int, indices: Optional[np.ndarray]):
        self.source, self.where, self.split = source, where, split
        self.rows, self.indices = rows, indices
        self.read = Metrics.counter(NAMESPACE, "records_read")

    def process(self, _):
        for start, images, labels, ids in self.source.chunks(self.split, self.where, self.rows):
            out = batch(ids, labels, images)
            if self.indices is not None:
                lo, hi = np.searchsorted(self.indices, [start, start + len(labels)])
                if lo == hi:
                    continue
                out = pick(out, self.indices[lo:hi] - start)
            self.read.inc(len(out["ids"]))
            yield out


def read_split(begin, source, split: str, where, image_shape):
    """PBegin -> the split's records {"id", "label", "encoded"} (a FileSource) or batches
    {"ids", "labels", "images"} (an IndexedSource): only the examples `where.indices` picks."""
    if source.reads_files:
        return read_files(begin, source, split, where)
    return read_indexed(begin, source, split, where, image_shape)


def read_indexed(begin, source, split: str, where, image_shape):
    size = source.size(split, where)
    indices = where.indices(split, size)
    rows = range_rows(image_shape)
    if source.sequential(split, where):
        return (begin | "Start" >> beam.Create([None])
                | "Stream" >> beam.ParDo(_ReadChunks(source, where, split, rows, indices)))
    if indices is None:
        pieces = [(start, min(start + rows, size), None) for start in range(0, size, rows)]
    else:  # `rows` picked examples per piece, read as the range that spans them.
        chunks = np.array_split(indices, -(-len(indices) // rows))
        pieces = [(int(c[0]), int(c[-1]) + 1,
                   None if c[-1] - c[0] + 1 == len(c) else [int(i) for i in c]) for c in chunks]
    return (begin | "Ranges" >> beam.Create(pieces) | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_ReadRange(source, where, split)))


class _ReadFile(beam.DoFn):
    """Reads one image file (a `fileio.ReadableFile`) with its name relative to `root` as
    id and its label from `labels` ({name: label})."""

    def __init__(self, root: str, labels: dict):
        self.root, self.labels = root, labels
        self.read = Metrics.counter(NAMESPACE, "records_read")

    def process(self, readable):
        name = os.path.relpath(readable.metadata.path, self.root).replace(os.sep, "/")
        self.read.inc()
        yield record(name, self.labels[name], encoded=readable.read())


class _ReadTarball(beam.DoFn):
    """Streams the members of a tarball named in `labels` ({name: label}); one worker reads
    it, since a gzip stream has no random access."""

    def __init__(self, labels: dict):
        self.labels = labels
        self.read = Metrics.counter(NAMESPACE, "records_read")

    def process(self, path: str):
        from pipeline.sources import files

        for name, encoded in files.tar_members(path, self.labels.__contains__):
            self.read.inc()
            yield record(name, self.labels[name], encoded=encoded)


def read_files(begin, source, split: str, where):
    from pipeline.sources import files

    names, labels, _ = source.listing(split, where)
    indices = where.indices(split, len(names))
    if indices is not None:
        names, labels = [names[i] for i in indices], np.asarray(labels)[indices]
    chosen = dict(zip(names, np.asarray(labels, np.int64).tolist()))
    root = source.root(where)
    if files.is_tarball(root):
        return (begin | "Tarball" >> beam.Create([root])
                | "Stream" >> beam.ParDo(_ReadTarball(chosen)) | "Spread" >> beam.Reshuffle())
    return (begin | "Files" >> beam.Create([os.path.join(root, n) for n in names])
            | "Spread" >> beam.Reshuffle() | "Open" >> fileio.ReadMatches()
            | "Read" >> beam.ParDo(_ReadFile(root, chosen)))
