"""The Beam extraction job and the code-record reader."""

import json
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from ordered_vqvae import configs, models
from pipeline import extract, schema, sources
from pipeline.config import DataConfig
from pipeline.sources import beam_reads

CONFIG = configs.preset("digits", hidden=(16,), latent_channels=8, codebook_size=32)


@pytest.fixture(scope="module")
def autoencoder_dir(tmp_path_factory):
    """An (untrained, deterministic) digits-shaped autoencoder saved to disk."""
    model = models.OrderedVQVAE(CONFIG)
    model(tf.zeros((1, 8, 8, 1)))
    rng = np.random.default_rng(0)
    model.quantizer.codebook.assign(rng.normal(size=(32, 16)).astype(np.float32))
    return models.save_autoencoder(model, str(tmp_path_factory.mktemp("ae") / "autoencoder"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """test/<class>/*.png: 24 good 8x8 grayscale images, one corrupt file, one 10x10 image."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    for cls in ("a", "b", "c"):
        os.makedirs(root / "test" / cls)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(
                root / "test" / cls / f"{i}.png")
    (root / "test" / "b" / "corrupt.png").write_bytes(b"\x89PNG but not really")
    Image.fromarray(np.zeros((10, 10), np.uint8), "L").save(root / "test" / "c" / "big.png")
    return str(root)


def _read_records(code_dir, split, K):
    paths = sorted(tf.io.gfile.glob(os.path.join(code_dir, f"{split}-*.tfrecord")))
    return [schema.parse_example(r.numpy(), K) for r in tf.data.TFRecordDataset(paths)]


def test_every_id_once_across_records_and_dead_letters(autoencoder_dir, folder):
    spec = DataConfig("image_folder", path=folder)
    all_ids = [f"test/{c}/{i}.png" for c in "abc" for i in range(8)]
    all_ids += ["test/b/corrupt.png", "test/c/big.png"]
    with TestPipeline() as p:
        encoded, dead = p | extract.ReadAndEncode(spec, "test", (8, 8, 1), autoencoder_dir,
                                                  num_shards=3, batch_size=5)
        records = encoded | beam.FlatMap(lambda kv: [(kv[0], record) for record in kv[1]])
        written_ids = records | beam.Map(lambda kv: kv[1][0])
        dead_ids = dead | "DeadIds" >> beam.Map(lambda d: d["id"])
        everything = (written_ids, dead_ids) | beam.Flatten()
        assert_that(everything, equal_to(all_ids))
        reasons = dead | "Reasons" >> beam.Map(lambda d: (d["id"], d["reason"].split(":")[0]))
        assert_that(reasons, equal_to([
            ("test/b/corrupt.png", "cannot decode image 'test/b/corrupt.png'"),
            ("test/c/big.png", "image 'test/c/big.png' has shape (10, 10, 1), expected (8, 8, 1) "
                               "(resize to make sizes agree)")]), label="CheckReasons")
        shards = records | "Shards" >> beam.Map(lambda kv: kv[0] == extract.shard_of(kv[1][0], 3))
        assert_that(shards | beam.Distinct(), equal_to([True]), label="CheckShards")


def test_run_writes_codes_equal_to_in_process_encode(autoencoder_dir, folder, tmp_path):
    out = str(tmp_path / "codes")
    meta = extract.run(autoencoder_dir, out, DataConfig("image_folder", path=folder),
                       splits=["test"], num_shards=3)
    assert meta["counts"] == {"test": 24} and meta["dead_letters"] == {"test": 2}
    assert meta["beam_counters"] == {"records_read": 26, "records_encoded": 24,
                                     "records_written": 24, "records_rejected": 2}
    assert meta["code_length"] == 8 and meta["codebook_size"] == 32
    assert meta["encoder_fingerprint"] == extract.encoder_fingerprint(autoencoder_dir)
    on_disk = json.load(open(os.path.join(out, schema.METADATA)))
    assert on_disk["counts"] == meta["counts"]
    dead = [json.loads(line) for line in open(os.path.join(out, "dead_letter-test.jsonl"))]
    assert sorted(d["id"] for d in dead) == ["test/b/corrupt.png", "test/c/big.png"]

    records = _read_records(out, "test", 8)
    model = models.load_autoencoder(autoencoder_dir)
    x, y, ids = _good_images(folder)
    expected = dict(zip(ids, model.encode(x).numpy().tolist()))
    assert sorted(r["id"] for r in records) == sorted(ids)
    for r in records:
        assert r["codes"] == expected[r["id"]] and r["split"] == "test"
    leftovers = [n for n in os.listdir(str(tmp_path)) if ".tmp-" in n]
    assert leftovers == []


def _good_images(folder):
    images, labels, ids = [], [], []
    for ci, c in enumerate("abc"):
        for i in range(8):
            path = os.path.join(folder, "test", c, f"{i}.png")
            images.append(np.asarray(Image.open(path), np.float32)[..., None] / 255.0)
            labels.append(ci)
            ids.append(f"test/{c}/{i}.png")
    return np.stack(images), np.array(labels), ids


def test_two_runs_are_byte_identical_and_reader_round_trips(autoencoder_dir, tmp_path):
    spec = DataConfig("digits")
    a = extract.run(autoencoder_dir, str(tmp_path / "a"), spec, num_shards=2)
    extract.run(autoencoder_dir, str(tmp_path / "b"), spec, num_shards=2,
                beam_args=["--direct_num_workers=2", "--direct_running_mode=multi_threading"])
    names = sorted(n for n in os.listdir(tmp_path / "a") if n.endswith(".tfrecord"))
    assert len(names) == 4
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    ds = schema.code_dataset(str(tmp_path / "a"), "test", batch_size=50, code_length=8,
                             codebook_size=32)
    batches = list(ds)
    assert batches[0].shape == (50, 8) and batches[0].dtype == tf.int32
    assert sum(len(b) for b in batches) == a["counts"]["test"] == 352
    codes, labels = next(iter(schema.code_dataset(str(tmp_path / "a"), "train", batch_size=8,
                                                  with_labels=True)))
    assert codes.shape == (8, 8) and labels.dtype == tf.int64


def test_refuses_existing_output_missing_encoder_and_mismatches(autoencoder_dir, tmp_path):
    spec = DataConfig("digits", max_test=40)
    out = str(tmp_path / "codes")
    extract.run(autoencoder_dir, out, spec, splits=["test"], num_shards=1)
    before = sorted(os.listdir(out))
    with pytest.raises(extract.ExtractError, match="already exists and holds another run's code shards"):
        extract.run(autoencoder_dir, out, spec, splits=["test"])
    assert sorted(os.listdir(out)) == before
    with pytest.raises(extract.ExtractError, match="is missing autoencoder.json"):
        extract.run(str(tmp_path / "nowhere"), str(tmp_path / "c2"), spec)
    with pytest.raises(schema.SchemaError, match="code_length=8, expected 16"):
        schema.code_dataset(out, "test", code_length=16)
    with pytest.raises(schema.SchemaError, match="codebook_size=32, expected 64"):
        schema.code_dataset(out, "test", codebook_size=64)
    with pytest.raises(schema.SchemaError, match="metadata.json is missing"):
        schema.code_dataset(str(tmp_path), "test")
    os.remove(os.path.join(out, schema.shard_name("test", 0, 1)))
    with pytest.raises(schema.SchemaError, match="missing 1 shard"):
        schema.code_dataset(out, "test")


def test_wrong_image_shape_for_the_encoder_and_failed_runs_leave_nothing(autoencoder_dir, tmp_path,
                                                                         mnist_dir):
    with pytest.raises(extract.ExtractError, match=r"\(28, 28, 1\), but the encoder expects \(8, 8, 1\)"):
        extract.run(autoencoder_dir, str(tmp_path / "c"), DataConfig("mnist", path=mnist_dir))
    with pytest.raises(sources.DataError, match="does not exist"):
        extract.run(autoencoder_dir, str(tmp_path / "c"),
                    DataConfig("mnist", path=str(tmp_path / "none")))
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_multiprocessing_direct_runner_gives_the_same_records(autoencoder_dir, tmp_path):
    spec = DataConfig("digits")
    extract.run(autoencoder_dir, str(tmp_path / "one"), spec, num_shards=2)
    extract.run(autoencoder_dir, str(tmp_path / "two"), spec, num_shards=2,
                beam_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    for name in sorted(os.listdir(tmp_path / "one")):
        if name.endswith(".tfrecord"):
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def _shard_bytes(directory):
    return {n: open(os.path.join(directory, n), "rb").read()
            for n in sorted(os.listdir(directory)) if n.endswith(".tfrecord")}


def _in_ranges(autoencoder_dir, spec, tmp_path, monkeypatch, range_size):
    """Extracts the test split whole, then in ranges of `range_size`; asserts identical
    shards and returns the second run's metadata (its codes are in tmp_path/"ranges")."""
    extract.run(autoencoder_dir, str(tmp_path / "whole"), spec, splits=["test"], num_shards=2)
    monkeypatch.setattr(beam_reads, "RANGE_SIZE", range_size)
    meta = extract.run(autoencoder_dir, str(tmp_path / "ranges"), spec, splits=["test"],
                       num_shards=2)
    assert _shard_bytes(tmp_path / "whole") == _shard_bytes(tmp_path / "ranges")
    return meta


def test_reads_in_pieces_give_the_same_shards_whatever_the_piece_size(autoencoder_dir, tmp_path,
                                                                      monkeypatch):
    spec = DataConfig("digits", max_test=300)  # Ranges of 37: 9, the last one short.
    meta = _in_ranges(autoencoder_dir, spec, tmp_path, monkeypatch, 37)
    assert meta["counts"] == {"test": 300} and meta["beam_counters"]["records_read"] == 300


def test_subsets_are_seeded_choices_and_samples_are_chosen_from_them():
    import dataclasses

    everything = sources.to_numpy(sources.load("digits", "test")[0])
    size = len(everything[2])
    spec = DataConfig("digits", max_test=120, subset_seed=2)
    picked = spec.indices("test", size)
    np.testing.assert_array_equal(picked, sources.random_indices(size, 120, 2))
    assert picked.max() > size // 2  # Spread over the split, not its first rows.
    assert spec.arrays("test")[2] == [everything[2][i] for i in picked]
    # A sample: 30 of those 120, sorted, read alike by dataset and image_batches.
    sample = spec.indices("test", size, sample=30)
    assert len(sample) == 30 and (np.diff(sample) > 0).all() and set(sample) <= set(picked)
    ids = [i.decode() for i in spec.dataset("test", sample=30).map(lambda e: e["id"])
           .as_numpy_iterator()]
    assert ids == [everything[2][i] for i in sample]
    np.testing.assert_array_equal(np.concatenate(list(spec.image_batches("test", 7, sample=30))),
                                  everything[0][sample])
    np.testing.assert_array_equal(spec.indices("test", size, sample=500), picked)
    whole = DataConfig("digits")
    assert whole.indices("test", size) is None
    np.testing.assert_array_equal(whole.indices("test", size, sample=30),
                                  sources.random_indices(size, 30, 0))
    # Caches made when max_test kept the first images do not match the seeded choice.
    assert whole.cache_inputs() == dataclasses.asdict(whole)
    assert spec.cache_inputs() == {**dataclasses.asdict(spec), "test_choice": "seeded"}


def test_max_train_extracts_the_images_training_reads(autoencoder_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(beam_reads, "RANGE_SIZE", 37)  # 3 pieces, each a range with picks.
    spec = DataConfig("digits", max_train=100, subset_seed=5)
    meta = extract.run(autoencoder_dir, str(tmp_path / "codes"), spec, splits=["train"],
                       num_shards=2)
    ids = sorted(r["id"] for r in _read_records(str(tmp_path / "codes"), "train", 8))
    assert meta["counts"] == {"train": 100} and meta["beam_counters"]["records_read"] == 100
    assert ids == sorted(spec.arrays("train")[2])
    everything = DataConfig("digits").arrays("train")[2]
    assert ids != sorted(everything[:100]) and set(ids) < set(everything)


def test_gzipped_idx_streams_to_the_bytes_that_ranges_of_raw_idx_give(autoencoder_dir, tmp_path,
                                                                     monkeypatch):
    import gzip
    import struct

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (300, 8, 8), dtype=np.uint8)  # 8x8: the test encoder's size.
    labels = rng.integers(0, 10, 300, dtype=np.uint8)
    for compress, directory in ((True, tmp_path / "gz"), (False, tmp_path / "raw")):
        os.makedirs(directory)
        for stem, array, magic in (("train-images-idx3-ubyte", images, 2051),
                                   ("train-labels-idx1-ubyte", labels, 2049)):
            raw = struct.pack(">I" + "I" * array.ndim, magic, *array.shape) + array.tobytes()
            with open(directory / (stem + (".gz" if compress else "")), "wb") as f:
                f.write(gzip.compress(raw) if compress else raw)
    monkeypatch.setattr(beam_reads, "RANGE_SIZE", 37)  # Stream chunks and ranges of 37.
    for limit in (None, 100):
        out = {}
        for name in ("gz", "raw"):
            spec = DataConfig("mnist", path=str(tmp_path / name), max_train=limit)
            out[name] = tmp_path / f"codes-{name}-{limit}"
            meta = extract.run(autoencoder_dir, str(out[name]), spec, splits=["train"],
                               num_shards=2)
            assert meta["counts"] == {"train": limit or 300}
            assert meta["beam_counters"]["records_read"] == (limit or 300)
        assert _shard_bytes(out["gz"]) == _shard_bytes(out["raw"])
        ids = sorted(r["id"] for r in _read_records(str(out["gz"]), "train", 8))
        assert ids == sorted(spec.arrays("train")[2])


def test_a_tarball_and_a_limited_folder_read_like_the_folder(autoencoder_dir, folder, tmp_path):
    import tarfile

    tarball = str(tmp_path / "images.tar.gz")
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(os.path.join(folder, "test"), arcname="test")
    a = extract.run(autoencoder_dir, str(tmp_path / "dir"), DataConfig("image_folder", path=folder),
                    splits=["test"], num_shards=2)
    b = extract.run(autoencoder_dir, str(tmp_path / "tar"),
                    DataConfig("image_folder", path=tarball), splits=["test"], num_shards=2)
    assert a["counts"] == b["counts"] == {"test": 24}
    assert a["dead_letters"] == b["dead_letters"] == {"test": 2}
    assert _shard_bytes(tmp_path / "dir") == _shard_bytes(tmp_path / "tar")
    # A seeded choice of 10 of the 26 files in sorted order, from every class (not the first
    # 10, which a class-sorted listing would fill with two classes).
    listing = ([f"test/a/{i}.png" for i in range(8)] + [f"test/b/{i}.png" for i in range(8)]
               + ["test/b/corrupt.png"] + [f"test/c/{i}.png" for i in range(8)] + ["test/c/big.png"])
    chosen = [listing[i] for i in sources.random_indices(len(listing), 10, seed=0)]
    assert {name.split("/")[1] for name in chosen} == {"a", "b", "c"}
    for name, path in (("dirlim", folder), ("tarlim", tarball)):
        meta = extract.run(autoencoder_dir, str(tmp_path / name),
                           DataConfig("image_folder", path=path, max_test=10), splits=["test"],
                           num_shards=1)
        ids = sorted(r["id"] for r in _read_records(str(tmp_path / name), "test", 8))
        assert meta["beam_counters"]["records_read"] == 10
        assert ids == [n for n in chosen if n not in ("test/b/corrupt.png", "test/c/big.png")]


def test_portable_runner_in_process_writes_the_direct_runners_bytes(autoencoder_dir, tmp_path,
                                                                     monkeypatch):
    from apache_beam.runners.portability.portable_runner import PortableRunner

    jobs = []
    run_pipeline = PortableRunner.run_pipeline
    monkeypatch.setattr(PortableRunner, "run_pipeline",
                        lambda self, *a, **k: jobs.append(type(self).__name__) or run_pipeline(self, *a, **k))
    spec = DataConfig("digits", max_test=120)
    extract.run(autoencoder_dir, str(tmp_path / "direct"), spec, splits=["test"], num_shards=2)
    assert jobs == []
    extract.run(autoencoder_dir, str(tmp_path / "portable"), spec, splits=["test"], num_shards=2,
                beam_args=["--runner=PortableRunner", "--job_endpoint=embed",
                           "--environment_type=LOOPBACK"])
    assert jobs == ["PortableRunner"]  # The portability layer ran the job.
    assert _shard_bytes(tmp_path / "direct") == _shard_bytes(tmp_path / "portable")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A real TFDS dataset of 8x8 images prepared offline from a builder defined here."""
    import tensorflow_datasets as tfds

    class OvqvaeTinyDigits(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1)),
                "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 40),
                    "test": self._generate_examples(1, 30)}

        def _generate_examples(self, seed, n):
            rng = np.random.default_rng(seed)
            for i in range(n):
                yield i, {"image": rng.integers(0, 256, (8, 8, 1), dtype=np.uint8),
                          "label": i % 3}

    directory = str(tmp_path_factory.mktemp("tfds"))
    tfds.builder("ovqvae_tiny_digits", data_dir=directory).download_and_prepare()
    return directory


def test_tfds_splits_are_read_in_index_ranges(autoencoder_dir, tfds_dir, tmp_path, monkeypatch):
    from pipeline.sources import tfds as tfds_source

    monkeypatch.setattr(tfds_source, "NAMES", tfds_source.NAMES + ("ovqvae_tiny_digits",))
    source = "tfds:ovqvae_tiny_digits"
    x, y, ids = sources.to_numpy(sources.load(source, "test", data_dir=tfds_dir)[0])
    spec = DataConfig(source, data_dir=tfds_dir)
    assert sources.get(source).size("test", spec) == len(ids) == 30
    part = sources.get(source).rows("test", spec, 7, 19)
    np.testing.assert_array_equal(part[0], x[7:19])
    assert part[2] == ids[7:19] and part[2][0] == "ovqvae_tiny_digits/test/7"
    # Ranges of 8: 4, the last one short.
    meta = _in_ranges(autoencoder_dir, spec, tmp_path, monkeypatch, 8)
    assert meta["counts"] == {"test": 30} and meta["beam_counters"]["records_read"] == 30
    records = {r["id"]: r for r in _read_records(str(tmp_path / "ranges"), "test", 8)}
    assert sorted(records) == sorted(ids) and records[ids[4]]["label"] == int(y[4])


def test_count_records_reads_length_prefixes_and_names_a_truncated_shard(tmp_path):
    path = str(tmp_path / "r.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for length in (0, 1, 300, 5):
            writer.write(b"x" * length)
    assert schema.count_records(path) == 4
    with tf.io.TFRecordWriter(str(tmp_path / "empty.tfrecord")):
        pass
    assert schema.count_records(str(tmp_path / "empty.tfrecord")) == 0
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-3])
    with pytest.raises(schema.SchemaError, match=r"r.tfrecord' ends inside record 3"):
        schema.count_records(path)
