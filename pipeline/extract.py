"""Stage 2: encode a dataset into TFRecords of code indices, as an Apache Beam job.

  read the split in pieces -> (files: decode, BatchElements) -> validate a batch at a time
  (failures -> dead letter) -> RunInference (the encoder) -> key by hash(id) -> write
  sorted shards

Reads are pieces that the runner spreads over its workers, so the parallelism is the
runner's: an index range of up to 2,048 examples (digits, uncompressed IDX files by offset,
TFDS by split slicing) or one image file (read by `fileio.ReadMatches`). A tarball or a
gzipped IDX file is one stream without random access: one worker reads it. A tarball's
files then go through a Reshuffle that spreads their decoding (the runner holds their
encoded bytes meanwhile: on a local runner, in memory); a gzipped IDX file's batches are
encoded by the worker that reads them. Each source says how it is read
(`pipeline.sources.beam_reads`). From the read (or, for files, from BatchElements after decoding) to the shard writer,
records travel in batches, so Beam's cost per element is paid once per batch. Encoding is
Beam's `RunInference` with a model handler for the encoder (one model per worker process,
shared by its threads; Beam's inference metrics under "ovqvae.encoder", counted in
batches).

The job writes into a staging directory beside the output and moves it into place only
after checking that every record read was written or dead-lettered, so a failed or killed
run never leaves a partial output under the final name. Output is deterministic: a record's
shard is a hash of its id and each shard is sorted by id, so two runs write identical bytes
whatever the runner and its parallelism. Sorting holds one shard's serialized records in a
worker's memory: about 2 x K + 60 bytes each (CelebA, K=64, 4 shards: 9 MB); more
--num_shards lower that bound.

Runs on the FnApiRunner by default: the DirectRunner's batch engine, named explicitly
because the DirectRunner first tries to fetch and start the Prism binary. Any other Beam
options pass through unchanged, e.g.
  --direct_num_workers=2 --direct_running_mode=multi_processing (local processes)
  --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp --setup_file=./setup.py
  --runner=PortableRunner --job_endpoint=embed --environment_type=LOOPBACK (Flink, Spark and
    Dataflow Runner v2 run through this portability layer)
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
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from ordered_vqvae.atomic import publish_directory
from ordered_vqvae.validation import image_problems
from pipeline import schema
from pipeline.sources.beam_reads import NAMESPACE, batch, pick
from pipeline.config import DataConfig

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


@beam.ptransform_fn
def ReadSplit(begin, spec: DataConfig, split: str, image_shape: Sequence[int]):
    """PBegin -> the split's records {"id", "label", "encoded"} (file sources) or batches
    {"ids", "labels", "images"} (indexed sources), as its source reads them
    (`pipeline.sources.beam_reads`): only the examples `spec.indices` picks."""
    from pipeline.sources import beam_reads

    return beam_reads.read_split(begin, spec.reader(), split, spec, image_shape)


class _Decode(beam.DoFn):
    """Decodes one file's bytes to the source's shape: (id, label, image), or a dead letter
    with the reason."""

    def __init__(self, spec: DataConfig, image_shape: Sequence[int]):
        self.spec, self.image_shape = spec, tuple(image_shape)
        self.rejected = Metrics.counter(NAMESPACE, "records_rejected")

    def setup(self):
        self.source = self.spec.reader()

    def process(self, record: dict):
        from pipeline.sources import DataError

        try:
            yield record["id"], record["label"], self.source.decode(
                record["encoded"], record["id"], self.image_shape, self.spec)
        except DataError as e:
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, {"id": record["id"], "reason": str(e)})


class _Validate(beam.DoFn):
    """Checks a batch's images for shape, finiteness and range, at once: failing records
    go to the dead-letter output with the reason, the rest on as a batch."""

    def __init__(self, image_shape: Sequence[int]):
        self.image_shape = tuple(image_shape)
        self.rejected = Metrics.counter(NAMESPACE, "records_rejected")

    def process(self, batch: dict):
        reasons = image_problems(batch["images"], self.image_shape)
        bad = [i for i, reason in enumerate(reasons) if reason]
        for i in bad:
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER,
                                           {"id": batch["ids"][i], "reason": reasons[i]})
        if bad:
            batch = pick(batch, [i for i, reason in enumerate(reasons) if not reason])
        if batch["ids"]:
            yield batch


class EncoderHandler(ModelHandler):
    """RunInference's model handler for the autoencoder's encoder. Its elements are batches
    ({"images": float32 [n,H,W,C], ...}, made by the reads or by BatchElements); each is
    encoded in calls of at most `max_rows` images, and its inference is codes int32 [n,K]."""

    def __init__(self, autoencoder_dir: str, image_shape: Sequence[int], max_rows: int = 256):
        super().__init__(min_batch_size=1, max_batch_size=1)
        self.autoencoder_dir, self.image_shape = autoencoder_dir, tuple(image_shape)
        self.max_rows = max_rows

    def load_model(self):
        import tensorflow as tf

        model = _load_encoder(self.autoencoder_dir)
        return tf.function(model.encode, input_signature=[
            tf.TensorSpec((None,) + self.image_shape, tf.float32)])

    def run_inference(self, batch, model, inference_args=None):
        results = []
        for element in batch:
            images = element["images"]
            codes = np.concatenate([model(images[i:i + self.max_rows]).numpy()
                                    for i in range(0, len(images), self.max_rows)])
            results.append(PredictionResult(element, codes))
        return results

    def get_num_bytes(self, batch) -> int:
        return sum(element["images"].nbytes for element in batch)

    def get_metrics_namespace(self) -> str:
        return "ovqvae.encoder"


class _Serialize(beam.DoFn):
    """PredictionResult of a batch -> (shard, [(id, serialized Example), ...]), one element
    per shard that the batch's ids hash to."""

    def __init__(self, split: str, num_shards: int):
        self.split, self.num_shards = split, num_shards
        self.encoded = Metrics.counter(NAMESPACE, "records_encoded")

    def process(self, result):
        batch, codes = result.example, result.inference
        shards = {}
        for record_id, label, row in zip(batch["ids"], batch["labels"], codes):
            shards.setdefault(shard_of(record_id, self.num_shards), []).append(
                (record_id, schema.serialize_example(record_id, label, row, self.split)))
        self.encoded.inc(len(batch["ids"]))
        yield from shards.items()


class _WriteShard(beam.DoFn):
    """Writes one shard's records, sorted by id, into the staging directory."""

    def __init__(self, staging: str, split: str, num_shards: int):
        self.staging, self.split, self.num_shards = staging, split, num_shards
        self.written = Metrics.counter(NAMESPACE, "records_written")

    def process(self, keyed):
        import tensorflow as tf

        index, groups = keyed
        path = os.path.join(self.staging, schema.shard_name(self.split, index, self.num_shards))
        count = 0
        with tf.io.TFRecordWriter(path) as writer:
            for _, serialized in sorted(record for group in groups for record in group):
                writer.write(serialized)
                count += 1
        self.written.inc(count)
        yield index, count


@beam.ptransform_fn
def ReadAndEncode(begin, spec: DataConfig, split: str, image_shape: Sequence[int],
                  autoencoder_dir: str, num_shards: int, batch_size: int = 256):
    """PBegin -> (PCollection of (shard, [(id, serialized Example), ...]), dead letters).

    Records travel in batches from the read (or, for files, from BatchElements after
    decoding) to the shard writer, so Beam's cost per element is paid per batch. Dead
    letters are {"id", "reason"} dicts for records that failed decoding or checks.
    """
    source = spec.reader()
    read = begin | "Read" >> ReadSplit(spec, split, image_shape)
    dead = []
    if source.reads_files:
        decoded = read | "Decode" >> beam.ParDo(_Decode(spec, image_shape)).with_outputs(
            DEAD_LETTER, main="ok")
        dead.append(decoded[DEAD_LETTER])
        read = (decoded.ok
                | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=batch_size)
                | "Stack" >> beam.Map(lambda records: batch(*zip(*records))))
    checked = read | "Validate" >> beam.ParDo(_Validate(image_shape)).with_outputs(
        DEAD_LETTER, main="ok")
    encoded = (checked.ok
               | "Encode" >> RunInference(EncoderHandler(autoencoder_dir, image_shape,
                                                         batch_size))
               | "Serialize" >> beam.ParDo(_Serialize(split, num_shards)))
    return encoded, (*dead, checked[DEAD_LETTER]) | "DeadLetters" >> beam.Flatten()


def _dead_letter_line(record: dict) -> str:
    return json.dumps(record, sort_keys=True)


def _counter(result, name: str) -> int:
    from apache_beam.metrics.metric import MetricsFilter

    found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE).with_name(name))
    return int(sum(c.committed or c.attempted or 0 for c in found["counters"]))


def _staging_directory(output_dir: str) -> str:
    """A new staging directory beside `output_dir`, after removing those of killed runs
    (their partial shards are never published)."""
    import tensorflow as tf

    parent = os.path.dirname(output_dir.rstrip("/")) or "."
    tf.io.gfile.makedirs(parent)
    prefix = os.path.join(parent, f".{os.path.basename(output_dir.rstrip('/'))}.tmp-")
    for stale in tf.io.gfile.glob(prefix + "*"):
        print(f"[extract] removing {stale}, left by an interrupted run", flush=True)
        tf.io.gfile.rmtree(stale)
    staging = prefix + uuid.uuid4().hex[:8]
    tf.io.gfile.makedirs(staging)
    return staging


def _check_shapes(spec: DataConfig, splits: List[str], image_shape) -> None:

    for split in splits:
        info = spec.info(split)
        if tuple(info.image_shape) != tuple(image_shape):
            raise ExtractError(f"{spec.source} {split} images have shape {info.image_shape}, "
                               f"but the encoder expects {tuple(image_shape)}")


def _pipeline(options, spec: DataConfig, splits: List[str], model_config, autoencoder_dir: str,
              staging: str, num_shards: int) -> beam.Pipeline:
    """Per split: read and encode, group by shard and write; dead letters to a JSONL file."""
    p = beam.Pipeline(options=options)
    for split in splits:
        encoded, dead = p | f"{split}/ReadAndEncode" >> ReadAndEncode(
            spec, split, model_config.image_shape, autoencoder_dir, num_shards)
        _ = (encoded
             | f"{split}/GroupByShard" >> beam.GroupByKey()
             | f"{split}/Write" >> beam.ParDo(_WriteShard(staging, split, num_shards)))
        _ = (dead
             | f"{split}/DeadLetterJson" >> beam.Map(_dead_letter_line)
             | f"{split}/DeadLetterWrite" >> beam.io.WriteToText(
                 os.path.join(staging, f"{DEAD_LETTER}-{split}"), file_name_suffix=".jsonl",
                 shard_name_template="", num_shards=1))
    return p


def _written(staging: str, splits: List[str], num_shards: int):
    """({split: records in its shards}, {split: dead letters}); a shard that no id hashed to
    is written empty, so every split has all its shards."""
    import tensorflow as tf

    counts, dead_counts = {}, {}
    for split in splits:
        n = 0
        for name in (schema.shard_name(split, i, num_shards) for i in range(num_shards)):
            path = os.path.join(staging, name)
            if not tf.io.gfile.exists(path):
                with tf.io.TFRecordWriter(path):
                    pass
            n += schema.count_records(path)
        counts[split] = n
        with tf.io.gfile.GFile(os.path.join(staging, f"{DEAD_LETTER}-{split}.jsonl")) as f:
            dead_counts[split] = sum(1 for line in f if line.strip())
    return counts, dead_counts


def run(autoencoder_dir: str, output_dir: str, spec: DataConfig,
        splits: Iterable[str] = ("train", "test"), num_shards: int = 4,
        beam_args: Optional[List[str]] = None,
        overwrite: bool = False) -> dict:
    """Runs the extraction and returns the metadata it wrote (with Beam counters).

    Args:
      autoencoder_dir: a directory written by `models.save_autoencoder` (local or gs://).
      output_dir: the code directory to create; it must not exist unless `overwrite`.
      spec: the data source.
      num_shards: output shards per split.
      beam_args: Beam pipeline options (runner, workers, Dataflow settings).
    """
    import tensorflow as tf

    if tf.io.gfile.exists(output_dir) and not overwrite:
        what = ("another run's code shards" if tf.io.gfile.exists(
            os.path.join(output_dir, schema.METADATA)) else "files")
        raise ExtractError(f"output directory {output_dir!r} already exists and holds {what}; "
                           "choose a new directory or pass overwrite=True")
    if num_shards < 1:
        raise ExtractError(f"num_shards={num_shards}, expected >= 1")
    fingerprint = encoder_fingerprint(autoencoder_dir)
    model_config = _encoder_config(autoencoder_dir)
    splits = list(splits)
    options = PipelineOptions(beam_args or [])
    if options.view_as(StandardOptions).runner is None:
        options.view_as(StandardOptions).runner = "FnApiRunner"
    staging = _staging_directory(output_dir)
    try:
        _check_shapes(spec, splits, model_config.image_shape)
        result = _pipeline(options, spec, splits, model_config, autoencoder_dir, staging,
                           num_shards).run()
        result.wait_until_finish()
        counts, dead_counts = _written(staging, splits, num_shards)
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
