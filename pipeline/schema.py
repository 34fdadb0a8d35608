"""The code-index TFRecords: the single source of truth for feature keys, parsing and reading.

A code directory holds, per split, shards `<split>-NNNNN-of-NNNNN.tfrecord` of
`tf.train.Example`s with features

  id     bytes        the source record id
  label  int64        the class label (-1 when unlabelled)
  codes  int64 [K]    the code indices, in order
  split  bytes        "train" or "test"

and `metadata.json` (see `write_metadata`) with K, the codebook size, the image shape,
the dataset, record counts per split and the fingerprint of the encoder that wrote them.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Optional

import numpy as np
import tensorflow as tf

from ordered_vqvae.atomic import write_json

ID, LABEL, CODES, SPLIT = "id", "label", "codes", "split"
METADATA = "metadata.json"
SHARD_SUFFIX = ".tfrecord"
FORMAT_VERSION = 1


class SchemaError(ValueError):
    """Code records or their metadata do not match what the reader expects."""


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def serialize_example(record_id: str, label: int, codes, split: str) -> bytes:
    """One serialized `tf.train.Example` for an encoded image."""
    feature = {
        ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[record_id.encode("utf-8")])),
        LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
        CODES: tf.train.Feature(int64_list=tf.train.Int64List(value=np.asarray(codes).tolist())),
        SPLIT: tf.train.Feature(bytes_list=tf.train.BytesList(value=[split.encode("utf-8")])),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)  # Map order fixed across processes.


def count_records(path: str) -> int:
    """The records in a TFRecord file, counted from their length prefixes (each record is
    a length, its CRC, the data and the data's CRC); raises SchemaError when the file ends
    inside a record."""
    with tf.io.gfile.GFile(path, "rb") as f:
        content = f.read()
    count, offset = 0, 0
    while offset + 8 <= len(content):
        end = offset + 16 + struct.unpack_from("<Q", content, offset)[0]
        if end > len(content):
            break
        count, offset = count + 1, end
    if offset != len(content):
        raise SchemaError(f"{path!r} ends inside record {count} ({len(content) - offset} "
                          "bytes of it): the shard is truncated")
    return count


def feature_spec(code_length: int) -> dict:
    """The parse spec for `tf.io.parse_example`."""
    return {
        ID: tf.io.FixedLenFeature([], tf.string),
        LABEL: tf.io.FixedLenFeature([], tf.int64),
        CODES: tf.io.FixedLenFeature([code_length], tf.int64),
        SPLIT: tf.io.FixedLenFeature([], tf.string),
    }


def parse_example(serialized: bytes, code_length: int) -> dict:
    """Parses one serialized example into Python values (for tests and tools)."""
    parsed = tf.io.parse_single_example(serialized, feature_spec(code_length))
    return {ID: parsed[ID].numpy().decode(), LABEL: int(parsed[LABEL]),
            CODES: parsed[CODES].numpy().tolist(), SPLIT: parsed[SPLIT].numpy().decode()}


def write_metadata(directory: str, metadata: dict) -> None:
    write_json(os.path.join(directory, METADATA), {"format_version": FORMAT_VERSION, **metadata})


def read_metadata(directory: str) -> dict:
    path = os.path.join(directory, METADATA)
    if not tf.io.gfile.exists(path):
        raise SchemaError(f"{directory!r} is not a code directory: {METADATA} is missing")
    with tf.io.gfile.GFile(path) as f:
        try:
            metadata = json.load(f)
        except json.JSONDecodeError as e:
            raise SchemaError(f"{path!r} is not valid JSON: {e}") from None
    for key in ("code_length", "codebook_size", "num_shards", "counts"):
        if key not in metadata:
            raise SchemaError(f"{path!r} lacks the field {key!r}")
    return metadata


def shard_paths(directory: str, split: str, metadata: Optional[dict] = None) -> list:
    """The shard files of a split, checked against the metadata's shard count."""
    metadata = metadata or read_metadata(directory)
    n = metadata["num_shards"]
    paths = [os.path.join(directory, shard_name(split, i, n)) for i in range(n)]
    missing = [p for p in paths if not tf.io.gfile.exists(p)]
    if missing:
        raise SchemaError(f"code directory {directory!r} is missing {len(missing)} shard(s) of "
                          f"split {split!r}, e.g. {missing[0]!r}")
    return paths


def code_dataset(directory: str, split: str, batch_size: Optional[int] = None,
                 code_length: Optional[int] = None, codebook_size: Optional[int] = None,
                 with_labels: bool = False, limit: int = 0) -> tf.data.Dataset:
    """Reads code records as int32 [B, K] batches (or [K] without batch_size).

    `code_length` / `codebook_size`, when given, must match the metadata: a prior trained for
    one autoencoder cannot silently read another's codes. With `with_labels` the elements
    are (codes, labels); `limit` > 0 keeps the first `limit` records (a fixed subset).
    """
    metadata = read_metadata(directory)
    for name, expected in (("code_length", code_length), ("codebook_size", codebook_size)):
        if expected is not None and metadata[name] != expected:
            raise SchemaError(f"code directory {directory!r} has {name}={metadata[name]}, "
                              f"expected {expected}")
    K, size = metadata["code_length"], metadata["codebook_size"]
    ds = tf.data.TFRecordDataset(shard_paths(directory, split, metadata))
    if split in metadata.get("counts", {}):  # Known sizes let Keras plan its epochs.
        ds = ds.apply(tf.data.experimental.assert_cardinality(metadata["counts"][split]))
    if limit:
        ds = ds.take(limit)
    if batch_size:
        ds = ds.batch(batch_size)
        parse = lambda x: tf.io.parse_example(x, feature_spec(K))  # noqa: E731
    else:
        parse = lambda x: tf.io.parse_single_example(x, feature_spec(K))  # noqa: E731

    def convert(serialized):
        parsed = parse(serialized)
        codes = tf.cast(parsed[CODES], tf.int32)
        tf.debugging.assert_less(codes, size, message=f"codes in {directory} exceed the "
                                 f"codebook size {size}")
        tf.debugging.assert_non_negative(codes, message=f"negative codes in {directory}")
        return (codes, parsed[LABEL]) if with_labels else codes

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def code_batches(directory: str, split: str, limit: int = 0, batch_size: int = 4096,
                 **checks) -> Iterator[np.ndarray]:
    """Yields the codes of a split as int32 [B, K] batches (`checks`: code_length,
    codebook_size), the first `limit` records when > 0. A corrupt shard is named in the
    SchemaError; a split without records is one."""
    ds = code_dataset(directory, split, batch_size=batch_size, limit=limit, **checks)
    empty = True
    try:
        for batch in ds.as_numpy_iterator():
            empty = False
            yield batch
    except tf.errors.DataLossError:
        for path in shard_paths(directory, split):  # Which one?
            try:
                tf.data.TFRecordDataset(path).reduce(0, lambda n, _: n + 1)
            except tf.errors.DataLossError as e:
                detail = e.message.split("}}")[-1].split("[Op:")[0].strip()
                raise SchemaError(f"code shard {path!r} is corrupt ({detail}); rerun the "
                                  "extract stage (ovqvae extract --force)") from None
        raise
    if empty:
        raise SchemaError(f"code directory {directory!r} holds no {split!r} records")

