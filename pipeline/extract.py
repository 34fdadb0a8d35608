"""Stage 2: encode a dataset into TFRecords of code indices, as an Apache Beam job.

  read shards of the source -> decode + validate (failures -> dead letter) -> batch ->
  encode (encoder loaded once per worker) -> key by hash(id) -> write sorted shards

The job writes into a staging directory beside the output and moves it into place only
after checking that every record read was written or dead-lettered, so a failed or killed
run never leaves a partial output under the final name. Output is deterministic: a record's
shard is a hash of its id and each shard is sorted by id, so two runs write identical bytes
whatever the runner and its parallelism.

Runs on the DirectRunner by default (named explicitly, so nothing tries to fetch a
portable-runner binary); any other Beam options pass through unchanged, e.g.
  --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp --setup_file=./setup.py
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
import zlib
from typing import Iterable, List, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from ordered_vqvae.atomic import publish_directory
from ordered_vqvae.validation import image_problems
from pipeline import schema
from pipeline.config import DataConfig

NAMESPACE = "ovqvae.extract"
DEAD_LETTER = "dead_letter"


class ExtractError(RuntimeError):
    """The extraction cannot run or did not account for every record."""


def encoder_fingerprint(autoencoder_dir: str) -> str:
    """sha256 over the autoencoder's config and weights files."""
    import tensorflow as tf

    from ordered_vqvae import models

    digest = hashlib.sha256()
    for name in (models.AUTOENCODER_CONFIG, models.AUTOENCODER_WEIGHTS):
        path = os.path.join(autoencoder_dir, name)
        if not tf.io.gfile.exists(path):
            raise ExtractError(f"encoder artifact {autoencoder_dir!r} is missing {name}")
        with tf.io.gfile.GFile(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def _load_encoder(autoencoder_dir: str):
    """Loads the autoencoder through tf.io.gfile (so gs:// works), on this worker."""
    import tensorflow as tf

    from ordered_vqvae import models

    local = tempfile.mkdtemp(prefix="ovqvae-encoder-")
    for name in (models.AUTOENCODER_CONFIG, models.AUTOENCODER_WEIGHTS):
        tf.io.gfile.copy(os.path.join(autoencoder_dir, name), os.path.join(local, name))
    try:
        return models.load_autoencoder(local)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _encoder_config(autoencoder_dir: str):
    import tensorflow as tf

    from ordered_vqvae import models
    from ordered_vqvae.configs import AutoencoderConfig

    with tf.io.gfile.GFile(os.path.join(autoencoder_dir, models.AUTOENCODER_CONFIG)) as f:
        return AutoencoderConfig.from_dict(json.load(f))


def shard_of(record_id: str, num_shards: int) -> int:
    return zlib.crc32(record_id.encode("utf-8")) % num_shards


class _ReadShard(beam.DoFn):
    """Reads the `index`-th of `num_read_shards` slices of a source split, in batches
    (lists of records) so that the steps after it work on arrays."""

    def __init__(self, spec: DataConfig, split: str, num_read_shards: int, batch_size: int):
        self.spec, self.split, self.num_read_shards = spec, split, num_read_shards
        self.batch_size = batch_size
        self.read = Metrics.counter(NAMESPACE, "records_read")

    def process(self, index: int):
        from ordered_vqvae import data

        ds, _ = data.load(self.spec.source, self.split, path=self.spec.path,
                          data_dir=self.spec.data_dir, image_size=self.spec.image_size,
                          decode=False)
        if self.spec.limit(self.split):
            ds = ds.take(self.spec.limit(self.split))
        for arrays in ds.shard(self.num_read_shards, index).batch(self.batch_size).as_numpy_iterator():
            self.read.inc(len(arrays["id"]))
            yield {"ids": [i.decode("utf-8") for i in arrays["id"]], "labels": arrays["label"],
                   **{k: arrays[k] for k in ("image", "encoded") if k in arrays}}


class _DecodeAndValidate(beam.DoFn):
    """Decodes encoded files and checks shape, finiteness and range. Each failing record
    goes to the dead-letter output with the reason; the rest go on as one array batch."""

    def __init__(self, image_shape: Sequence[int], resize: bool):
        self.image_shape, self.resize = tuple(image_shape), resize
        self.rejected = Metrics.counter(NAMESPACE, "records_rejected")

    def _decode(self, batch: dict):
        from ordered_vqvae import data

        images, reasons = [], []
        for record_id, encoded in zip(batch["ids"], batch["encoded"]):
            try:
                images.append(data.decode_encoded(encoded, record_id, self.image_shape, self.resize))
                reasons.append(None)
            except data.DataError as e:
                images.append(np.zeros(self.image_shape, np.float32))
                reasons.append(str(e))
        return np.stack(images), reasons

    def process(self, batch: dict):
        if "encoded" in batch:
            images, reasons = self._decode(batch)
        else:
            images, reasons = np.asarray(batch["image"], np.float32), [None] * len(batch["ids"])
        checks = image_problems(images, self.image_shape)
        reasons = [r or c for r, c in zip(reasons, checks)]
        for record_id, reason in zip(batch["ids"], reasons):
            if reason:
                self.rejected.inc()
                yield beam.pvalue.TaggedOutput(DEAD_LETTER, {"id": record_id, "reason": reason})
        keep = [i for i, r in enumerate(reasons) if r is None]
        if keep:
            yield {"ids": [batch["ids"][i] for i in keep], "labels": batch["labels"][keep],
                   "images": images[keep]}


class _EncodeBatch(beam.DoFn):
    """Encodes a batch with the autoencoder (loaded once per worker) and emits, per output
    shard, the list of (id, serialized Example) of this batch."""

    def __init__(self, autoencoder_dir: str, split: str, num_shards: int):
        self.autoencoder_dir, self.split, self.num_shards = autoencoder_dir, split, num_shards
        self.encoded = Metrics.counter(NAMESPACE, "records_encoded")
        self._encode = None

    def setup(self):
        import tensorflow as tf

        model = _load_encoder(self.autoencoder_dir)
        self._encode = tf.function(model.encode, input_signature=[
            tf.TensorSpec((None,) + model.image_shape, tf.float32)])

    def process(self, batch: dict):
        codes = self._encode(batch["images"]).numpy()
        self.encoded.inc(len(codes))
        by_shard = {}
        for record_id, label, row in zip(batch["ids"], batch["labels"], codes):
            serialized = schema.serialize_example(record_id, label, row, self.split)
            by_shard.setdefault(shard_of(record_id, self.num_shards), []).append(
                (record_id, serialized))
        yield from by_shard.items()


class _WriteShard(beam.DoFn):
    """Writes one shard's records, sorted by id, into the staging directory."""

    def __init__(self, staging: str, split: str, num_shards: int):
        self.staging, self.split, self.num_shards = staging, split, num_shards
        self.written = Metrics.counter(NAMESPACE, "records_written")

    def process(self, keyed):
        import tensorflow as tf

        index, groups = keyed
        records = sorted(r for group in groups for r in group)
        path = os.path.join(self.staging, schema.shard_name(self.split, index, self.num_shards))
        with tf.io.TFRecordWriter(path) as writer:
            for _, serialized in records:
                writer.write(serialized)
        self.written.inc(len(records))
        yield index, len(records)


@beam.ptransform_fn
def ReadAndEncode(begin, spec: DataConfig, split: str, image_shape: Sequence[int],
                  autoencoder_dir: str, num_shards: int, num_read_shards: int = 4,
                  batch_size: int = 256):
    """PBegin -> (PCollection of (shard, [(id, serialized Example)]), dead letters).

    Dead letters are {"id", "reason"} dicts for records that failed decoding or checks.
    """
    decoded = (begin
               | "Slices" >> beam.Create(list(range(num_read_shards)))
               | "Read" >> beam.ParDo(_ReadShard(spec, split, num_read_shards, batch_size))
               | "Validate" >> beam.ParDo(_DecodeAndValidate(image_shape, spec.image_size is not None)
                                          ).with_outputs(DEAD_LETTER, main="ok"))
    encoded = decoded.ok | "Encode" >> beam.ParDo(_EncodeBatch(autoencoder_dir, split, num_shards))
    return encoded, decoded[DEAD_LETTER]


def _dead_letter_line(record: dict) -> str:
    return json.dumps(record, sort_keys=True)


def _source_info(spec: DataConfig, split: str):
    from ordered_vqvae import data

    _, info = data.load(spec.source, split, path=spec.path, data_dir=spec.data_dir,
                        image_size=spec.image_size, decode=False)
    return info


def _counter(result, name: str) -> int:
    from apache_beam.metrics.metric import MetricsFilter

    found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE).with_name(name))
    return int(sum(c.committed or c.attempted or 0 for c in found["counters"]))


def run(autoencoder_dir: str, output_dir: str, spec: DataConfig,
        splits: Iterable[str] = ("train", "test"), num_shards: int = 4,
        num_read_shards: int = 4, beam_args: Optional[List[str]] = None,
        overwrite: bool = False) -> dict:
    """Runs the extraction and returns the metadata it wrote (with Beam counters).

    Args:
      autoencoder_dir: a directory written by `models.save_autoencoder` (local or gs://).
      output_dir: the code directory to create; it must not exist unless `overwrite`.
      spec: the data source.
      num_shards: output shards per split; num_read_shards: parallel read slices.
      beam_args: Beam pipeline options (runner, workers, Dataflow settings).
    """
    import tensorflow as tf

    if tf.io.gfile.exists(output_dir):
        if not overwrite:
            what = ("another run's code shards" if tf.io.gfile.exists(
                os.path.join(output_dir, schema.METADATA)) else "files")
            raise ExtractError(f"output directory {output_dir!r} already exists and holds {what}; "
                               "choose a new directory or pass overwrite=True")
    if num_shards < 1 or num_read_shards < 1:
        raise ExtractError(f"num_shards={num_shards}, num_read_shards={num_read_shards}, "
                           "expected >= 1")
    fingerprint = encoder_fingerprint(autoencoder_dir)
    model_config = _encoder_config(autoencoder_dir)
    splits = list(splits)

    options = PipelineOptions(beam_args or [])
    if options.view_as(StandardOptions).runner is None:
        options.view_as(StandardOptions).runner = "DirectRunner"
    parent = os.path.dirname(output_dir.rstrip("/")) or "."
    tf.io.gfile.makedirs(parent)
    prefix = os.path.join(parent, f".{os.path.basename(output_dir.rstrip('/'))}.tmp-")
    # A killed run leaves its staging directory; its partial shards are never published.
    for stale in tf.io.gfile.glob(prefix + "*"):
        print(f"[extract] removing {stale}, left by an interrupted run", flush=True)
        tf.io.gfile.rmtree(stale)
    staging = prefix + uuid.uuid4().hex[:8]
    tf.io.gfile.makedirs(staging)
    counts, dead_counts = {}, {}
    try:
        infos = {split: _source_info(spec, split) for split in splits}
        for split, info in infos.items():
            if tuple(info.image_shape) != tuple(model_config.image_shape):
                raise ExtractError(f"{spec.source} {split} images have shape {info.image_shape}, "
                                   f"but the encoder expects {tuple(model_config.image_shape)}")
        p = beam.Pipeline(options=options)
        for split in splits:
            encoded, dead = p | f"{split}/ReadAndEncode" >> ReadAndEncode(
                spec, split, model_config.image_shape, autoencoder_dir, num_shards,
                num_read_shards)
            _ = (encoded
                 | f"{split}/GroupByShard" >> beam.GroupByKey()
                 | f"{split}/Write" >> beam.ParDo(_WriteShard(staging, split, num_shards)))
            _ = (dead
                 | f"{split}/DeadLetterJson" >> beam.Map(_dead_letter_line)
                 | f"{split}/DeadLetterWrite" >> beam.io.WriteToText(
                     os.path.join(staging, f"{DEAD_LETTER}-{split}"), file_name_suffix=".jsonl",
                     shard_name_template="", num_shards=1))
        result = p.run()
        result.wait_until_finish()
        for split in splits:
            written = [schema.shard_name(split, i, num_shards) for i in range(num_shards)]
            n = 0
            for name in written:
                path = os.path.join(staging, name)
                if not tf.io.gfile.exists(path):  # A shard that no id hashed to.
                    with tf.io.TFRecordWriter(path):
                        pass
                n += int(tf.data.TFRecordDataset(path).reduce(0, lambda count, _: count + 1))
            counts[split] = n
            with tf.io.gfile.GFile(os.path.join(staging, f"{DEAD_LETTER}-{split}.jsonl")) as f:
                dead_counts[split] = sum(1 for line in f if line.strip())
        beam_counters = {name: _counter(result, name) for name in
                         ("records_read", "records_encoded", "records_written", "records_rejected")}
        read = beam_counters["records_read"]
        if read != sum(counts.values()) + sum(dead_counts.values()):
            raise ExtractError(f"read {read} records but wrote {sum(counts.values())} and "
                               f"dead-lettered {sum(dead_counts.values())}")
        metadata = {
            "code_length": model_config.code_length,
            "codebook_size": model_config.codebook_size,
            "image_shape": list(model_config.image_shape),
            "dataset": dataclasses.asdict(spec),
            "num_shards": num_shards,
            "splits": splits,
            "counts": counts,
            "dead_letters": dead_counts,
            "encoder_fingerprint": fingerprint,
            "beam_counters": beam_counters,
        }
        schema.write_metadata(staging, metadata)
        publish_directory(staging, output_dir)
    finally:
        if tf.io.gfile.exists(staging):
            tf.io.gfile.rmtree(staging)
    return metadata
