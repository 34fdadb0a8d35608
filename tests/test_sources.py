"""The data sources as a registry: every module of pipeline/sources defining SOURCE is
found by name, the command line accepts exactly those, and a source added as one file in
the package (here the `npz` source, and one written into a temporary directory) works
through the training stream and the Beam extraction without any other edit."""

import textwrap

import numpy as np
import pytest

from pipeline import cli, sources
from pipeline.config import DataConfig


def _write_npz(path, n_train=40, n_test=12, labels=True, shape=(8, 8)):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
              "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8)}
    if labels:
        arrays.update(y_train=rng.integers(0, 10, n_train), y_test=rng.integers(0, 10, n_test))
    np.savez(path, **arrays)
    return arrays


def test_every_source_module_is_registered_and_the_cli_names_them():
    registry = sources.registry()
    assert sorted(registry) == ["celeba", "cifar10", "digits", "image_folder", "mnist", "npz",
                                "tfds"]
    assert registry["cifar10"] is registry["image_folder"]
    help_text = " ".join(cli.FLAGS["dataset"].help.split())
    assert all(name.split(":")[0] in help_text for name in sources.names()), help_text
    with pytest.raises(sources.DataError, match=r"unknown data source 'svhn', expected one of "
                       r"celeba, cifar10, digits, image_folder, mnist, npz, tfds:<name>"):
        sources.get("svhn")
    with pytest.raises(sources.DataError, match="source 'mnist' takes no argument"):
        sources.get("mnist:x")


def test_npz_source_reads_keras_dataset_files_exactly(tmp_path):
    path = str(tmp_path / "mnist.npz")
    arrays = _write_npz(path)
    ds, info = sources.load("npz", "test", path=path)
    x, y, ids = sources.to_numpy(ds)
    assert info.image_shape == (8, 8, 1) and info.num_examples == 12
    np.testing.assert_allclose(x[..., 0], arrays["x_test"] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(y, arrays["y_test"])
    assert ids[:2] == ["test/00000", "test/00001"]
    where = DataConfig("npz", path=path)
    rows = sources.get("npz").rows("train", where, 5, 9)
    np.testing.assert_allclose(rows[0][..., 0], arrays["x_train"][5:9] / 255.0, atol=1e-7)
    picked = sources.to_numpy(sources.load("npz", "train", path=path, indices=[3, 7])[0])
    assert picked[2] == ["train/00003", "train/00007"]


def test_npz_source_names_what_is_wrong(tmp_path):
    with pytest.raises(sources.DataError, match="npz file .*nope.npz' does not exist"):
        sources.source_info("npz", "train", path=str(tmp_path / "nope.npz"))
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(sources.DataError, match=r"holds \['images'\], expected x_train"):
        sources.source_info("npz", "train", path=str(tmp_path / "a.npz"))
    np.savez(tmp_path / "b.npz", x_train=np.full((2, 4, 4), 2.0))
    with pytest.raises(sources.DataError, match="x_train in .* is float64, expected uint8"):
        sources.source_info("npz", "train", path=str(tmp_path / "b.npz"))
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(sources.DataError, match="cannot read npz file"):
        sources.source_info("npz", "train", path=str(tmp_path / "c.npz"))
    with pytest.raises(sources.DataError, match="source 'npz' needs a path"):
        sources.source_info("npz", "train")


NEW_SOURCE = '''
"""``noise``: seeded uniform noise images, a source written in one file."""

import numpy as np

from pipeline.sources.base import IndexedSource, SourceInfo, check_indices, from_arrays


class Noise(IndexedSource):
    name = "noise"
    resizable = False

    def _arrays(self, split):
        n = {"train": 30, "test": 10}[split]
        images = np.random.default_rng(len(split)).integers(0, 256, (n, 4, 4, 1), np.uint8)
        return images, np.arange(n) % 2, [f"noise/{split}/{i}" for i in range(n)]

    def size(self, split, where):
        return len(self._arrays(split)[2])

    def info(self, split, where):
        return SourceInfo(self.name, (4, 4, 1), self.size(split, where), ("a", "b"))

    def stream(self, split, where, indices=None, decode=True):
        images, labels, ids = self._arrays(split)
        return from_arrays(images, labels, ids, 255.0, check_indices(indices, len(ids)))

    def rows(self, split, where, start, stop):
        images, labels, ids = self._arrays(split)
        return images[start:stop] / np.float32(255), labels[start:stop], ids[start:stop]


SOURCE = Noise
'''


def test_a_source_added_as_one_file_runs_through_training_data_and_extraction(
        tmp_path, monkeypatch):
    import tensorflow as tf

    from ordered_vqvae import configs, models
    from pipeline import extract, schema

    package = tmp_path / "more_sources"
    package.mkdir()
    (package / "noise.py").write_text(textwrap.dedent(NEW_SOURCE))
    monkeypatch.setattr(sources, "__path__", list(sources.__path__) + [str(package)])
    sources.registry.cache_clear()
    try:
        assert "noise" in sources.names()
        spec = DataConfig("noise", max_train=12)
        assert spec.splits()["train"].num_examples == 30
        batches = list(spec.image_batches("train", batch_size=5))
        assert [len(b) for b in batches] == [5, 5, 2]
        model = models.OrderedVQVAE(configs.preset("digits", image_shape=(4, 4, 1),
                                                   hidden=(8,), latent_channels=4,
                                                   codebook_size=8))
        model(np.zeros((1, 4, 4, 1), np.float32))
        models.save_autoencoder(model, str(tmp_path / "ae"))
        meta = extract.run(str(tmp_path / "ae"), str(tmp_path / "codes"), spec, num_shards=2)
        assert meta["counts"] == {"train": 12, "test": 10}
        assert meta["beam_counters"]["records_read"] == 22
        ids = [schema.parse_example(r.numpy(), model.config.code_length)["id"]
               for path in schema.shard_paths(str(tmp_path / "codes"), "test")
               for r in tf.data.TFRecordDataset(path)]
        assert sorted(ids) == sorted(f"noise/test/{i}" for i in range(10))
    finally:
        sources.registry.cache_clear()
