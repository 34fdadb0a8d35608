"""CelebA from its own files (a generated stand-in): splits, the 140-pixel center crop, the
tarball layout, and the pipeline end to end."""

import os
import tarfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline import sources, stages
from pipeline.config import DataConfig, pipeline_preset
from pipeline.sources import celeba as celeba_source

# Image number -> partition (0 train, 1 validation, 2 test), inside the official ranges.
NUMBERS = {**{n: 0 for n in range(1, 13)}, 162771: 1, 162772: 1,
           **{n: 2 for n in range(182638, 182644)}}


def _frame(number: int) -> np.ndarray:
    """A 218x178 RGB frame whose center differs from its border."""
    rng = np.random.default_rng(number)
    frame = np.full((218, 178, 3), 30, np.uint8)
    frame[39:179, 19:159] = rng.integers(60, 256, (140, 140, 3), dtype=np.uint8)
    return frame


@pytest.fixture(scope="module")
def celeba(tmp_path_factory):
    root = tmp_path_factory.mktemp("celeba")
    os.makedirs(root / celeba_source.FOLDER)
    for n in NUMBERS:
        Image.fromarray(_frame(n)).save(root / celeba_source.FOLDER / f"{n:06d}.jpg", quality=95)
    (root / celeba_source.PARTITION).write_text(
        "".join(f"{n:06d}.jpg {p}\n" for n, p in sorted(NUMBERS.items())))
    return str(root)


def test_splits_follow_the_partition_file_or_the_official_ranges(celeba, tmp_path):
    train = celeba_source.celeba_files(celeba, "train")
    test = celeba_source.celeba_files(celeba, "test")
    assert train == [f"img_align_celeba/{n:06d}.jpg" for n in range(1, 13)]
    assert test == [f"img_align_celeba/{n:06d}.jpg" for n in range(182638, 182644)]
    # Without the file: the same split from the numbers; a moved image follows the file.
    os.symlink(os.path.join(celeba, celeba_source.FOLDER), tmp_path / celeba_source.FOLDER)
    assert celeba_source.celeba_files(str(tmp_path), "train") == train
    (tmp_path / celeba_source.PARTITION).write_text(
        "".join(f"{n:06d}.jpg {2 if n == 3 else p}\n" for n, p in sorted(NUMBERS.items())))
    assert "img_align_celeba/000003.jpg" in celeba_source.celeba_files(str(tmp_path), "test")
    (tmp_path / celeba_source.PARTITION).write_text("000001.jpg train\n")
    with pytest.raises(sources.DataError, match=r"line 1 is '000001.jpg train', expected"):
        celeba_source.celeba_files(str(tmp_path), "train")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(sources.DataError, match="empty' holds no img_align_celeba/"):
        celeba_source.celeba_files(str(tmp_path / "empty"), "train")
    with pytest.raises(sources.DataError, match="nowhere' does not exist"):
        celeba_source.celeba_files(str(tmp_path / "nowhere"), "train")


def test_images_are_the_center_140_crop_resized_and_a_tarball_reads_the_same(celeba, tmp_path):
    ds, info = sources.load("celeba", "test", path=celeba)
    x, y, ids = sources.to_numpy(ds)
    assert info.image_shape == (64, 64, 3) and x.shape == (6, 64, 64, 3)
    assert (y == -1).all() and ids[0] == "img_align_celeba/182638.jpg"
    raw = open(os.path.join(celeba, ids[0]), "rb").read()
    jpeg = tf.cast(tf.io.decode_jpeg(raw), tf.float32).numpy() / 255.0  # 218 x 178
    expected = tf.image.resize(jpeg[39:179, 19:159], (64, 64), method="area", antialias=True)
    np.testing.assert_allclose(x[0], np.clip(expected.numpy(), 0, 1), atol=1e-5)
    assert x[0].min() > 50 / 255  # Nothing of the 30-valued border survives the crop.
    tarball = str(tmp_path / "celeba.tar.gz")
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(celeba, arcname=".")
    x2, _, ids2 = sources.to_numpy(sources.load("celeba", "test", path=tarball)[0])
    assert ids2 == [i.replace("img_align_celeba", "./img_align_celeba") for i in ids]
    np.testing.assert_array_equal(x2, x)


def test_the_pipeline_runs_end_to_end_on_celeba_files(celeba, tmp_path):
    (open(os.path.join(celeba, celeba_source.FOLDER, "000012.jpg"), "wb")
     .write(b"\xff\xd8 not a jpeg"))  # One corrupt training image: a dead letter.
    config = pipeline_preset(
        "celeba", data=DataConfig("celeba", path=celeba),
        autoencoder_overrides=dict(hidden=(8, 8, 8), latent_channels=4, codebook_size=16,
                                   epochs=1, batch_size=4),
        prior_overrides=dict(num_layers=1, width=16, num_heads=2, ffn_width=32, epochs=1,
                             batch_size=4, warmup_steps=2))
    workdir = str(tmp_path / "wd")
    with pytest.raises(sources.DataError, match="cannot decode image 'img_align_celeba/000012.jpg'"):
        stages.run_stage(config, workdir, "autoencoder", verbose=0)
    os.remove(os.path.join(celeba, celeba_source.FOLDER, "000012.jpg"))
    Image.fromarray(_frame(12)).save(os.path.join(celeba, celeba_source.FOLDER, "000012.jpg"))
    manifests = stages.run_pipeline(config, workdir, ["autoencoder", "extract", "prior"],
                                    verbose=0)
    assert manifests["extract"]["result"] == {"counts": {"train": 12, "test": 6},
                                              "dead_letters": {"train": 0, "test": 0}}
    assert manifests["autoencoder"]["result"]["test_images"] == 6
    assert np.isfinite(manifests["prior"]["result"]["val_bits_per_code"])
