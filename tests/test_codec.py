"""Adaptive-length codes: the SavedModel's encode_to_quality signature against a NumPy
search over every prefix, and `ovqvae encode` then `ovqvae decode` as a round trip."""

import os

import numpy as np
import pytest
from PIL import Image

from conftest import copy_run, ovqvae
from pipeline import sources


@pytest.fixture(scope="module")
def model(finished_run):
    import tensorflow as tf

    path = os.path.join(finished_run, "saved_model")
    return path, tf.saved_model.load(path)


def _prefix_errors(module, images):
    """MSE [N, K] of each image decoded from its first k codes, k = 1..K."""
    import tensorflow as tf

    codes = module.signatures["encode"](images=tf.constant(images))["codes"]
    K = codes.shape[1]
    return np.stack([((module.signatures["decode_at"](
        codes=codes, num_codes=tf.fill([len(images)], k))["images"].numpy() - images) ** 2)
        .mean(axis=(1, 2, 3)) for k in range(1, K + 1)], axis=1)


def test_encode_to_quality_gives_each_image_its_smallest_k(model):
    import tensorflow as tf

    _, module = model
    images = sources.to_numpy(sources.load("digits", "test")[0])[0][:48]
    errors = _prefix_errors(module, images)
    K = errors.shape[1]
    for target in np.quantile(errors[:, K // 2 - 1], [0.1, 0.5, 0.9]):
        out = {k: v.numpy() for k, v in module.signatures["encode_to_quality"](
            images=tf.constant(images), max_mse=tf.constant(target, tf.float32)).items()}
        meets = errors <= np.float32(target)
        want = np.where(meets.any(axis=1), meets.argmax(axis=1) + 1, K)
        np.testing.assert_array_equal(out["num_codes"], want)
        np.testing.assert_allclose(out["mse"], errors[np.arange(len(images)), want - 1],
                                   rtol=1e-5, atol=1e-7)
        assert 1 < len(set(want.tolist()))  # Images differ in what they need.
        beyond = np.arange(K)[None] >= want[:, None]
        assert (out["codes"][beyond] == 0).all()
    for target, k in ((errors.max() * 2, 1), (errors.min() / 2, K)):  # All at once; none.
        out = module.signatures["encode_to_quality"](images=tf.constant(images),
                                                     max_mse=tf.constant(target, tf.float32))
        np.testing.assert_array_equal(out["num_codes"].numpy(), np.full(len(images), k))
        np.testing.assert_allclose(out["mse"].numpy(), errors[:, k - 1], rtol=1e-5, atol=1e-7)
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_mse="):
        module.signatures["encode_to_quality"](images=tf.constant(images),
                                               max_mse=tf.constant(0.0))


def test_encode_then_decode_reproduces_the_signatures_reconstructions(model, tmp_path):
    import tensorflow as tf

    path, module = model
    images = sources.to_numpy(sources.load("digits", "test")[0])[0][:30]
    pixels = np.round(images * 255).astype(np.uint8)
    for i, image in enumerate(pixels):  # Class folders and a flat file.
        folder = tmp_path / "photos" / (f"c{i % 3}" if i else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(folder / f"img{i:02d}.png")
    stored = pixels.astype(np.float32) / 255
    psnr_at_k = 10 * np.log10(1 / np.maximum(_prefix_errors(module, stored), 1e-12))
    target = float(psnr_at_k[:, -1].min()) - 0.5  # Reachable by every image.
    out = ovqvae("encode", f"--saved_model={path}", f"--data_path={tmp_path / 'photos'}",
                 f"--min_psnr={target}", f"--output={tmp_path / 'codes.npz'}", check_rc=0)
    assert "bits per pixel" in out.stdout and "5th percentile" in out.stdout
    npz = np.load(tmp_path / "codes.npz")
    order = [int(i[3:]) for i in npz["ids"]]
    assert sorted(order) == list(range(30)) and npz["codes"].shape == (30, psnr_at_k.shape[1])
    want = np.where((psnr_at_k >= target).any(axis=1), (psnr_at_k >= target).argmax(axis=1) + 1,
                    psnr_at_k.shape[1])
    np.testing.assert_array_equal(npz["num_codes"], want[order])
    ovqvae("decode", f"--saved_model={path}", f"--codes={tmp_path / 'codes.npz'}",
           f"--output={tmp_path / 'decoded'}", check_rc=0)
    expected = module.signatures["decode_at"](codes=tf.constant(npz["codes"]),
                                              num_codes=tf.constant(npz["num_codes"]))
    expected = expected["images"].numpy()
    for image_id, want_image, original in zip(npz["ids"], expected, stored[order]):
        got = np.asarray(Image.open(tmp_path / "decoded" / f"{image_id}.png"))
        np.testing.assert_array_equal(got, np.round(np.clip(want_image[..., 0], 0, 1) * 255))
        assert 10 * np.log10(1 / ((want_image - original) ** 2).mean()) >= target - 1e-4


def test_bad_codec_inputs_name_what_is_wrong(model, tmp_path):
    from pipeline import codec
    from pipeline.run_config import UsageError

    path, _ = model
    (tmp_path / "photos").mkdir()
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "photos" / "odd.png")
    photos, npz = str(tmp_path / "photos"), str(tmp_path / "c.npz")
    np.savez(tmp_path / "wrong.npz", ids=np.array(["a"]), codes=np.zeros((1, 3), np.int32),
             num_codes=np.ones(1, np.int32))
    cases = [
        (lambda: codec.encode(path, photos, npz), UsageError,
         "one target of --min_psnr, --max_mse and --num_codes; got none"),
        (lambda: codec.encode(path, photos, npz, min_psnr=20, max_mse=0.1), UsageError,
         r"got \['min_psnr', 'max_mse'\]"),
        (lambda: codec.encode(path, photos, npz, max_mse=-1), UsageError, "--max_mse=-1"),
        (lambda: codec.encode(path, photos, npz, max_mse=0.1), ValueError,
         "odd.png is 9x9, the model takes 8x8"),
        (lambda: codec.encode(path, str(tmp_path / "none"), npz, max_mse=0.1), UsageError,
         "is not a directory of images"),
        (lambda: codec.decode(path, str(tmp_path / "photos" / "odd.png"),
                              str(tmp_path / "out")), UsageError, "is not a codes .npz"),
        (lambda: codec.decode(path, npz, photos), UsageError,
         "exists and is not an empty directory"),
        (lambda: codec.decode(path, str(tmp_path / "wrong.npz"), str(tmp_path / "o")),
         UsageError, r"codes \[1, 3\] and num_codes \[1\] for 1 ids; the model takes \[N, 8\]"),
    ]
    for call_it, error, message in cases:
        with pytest.raises(error, match=message):
            call_it()
    assert not (tmp_path / "c.npz").exists() and not (tmp_path / "o").exists()
    # On the command line: a usage error exits 2, a bad image 1.
    assert "got none" in ovqvae("encode", f"--saved_model={path}", f"--data_path={photos}",
                                f"--output={npz}", check_rc=2).stderr
    assert "odd.png is 9x9" in ovqvae("encode", f"--saved_model={path}",
                                      f"--data_path={photos}", f"--output={npz}",
                                      "--max_mse=0.1", check_rc=1).stderr


def test_every_saved_model_carries_its_measured_quality_profile(model, finished_run):
    import json

    import tensorflow as tf

    from pipeline import stages
    from pipeline.config import PipelineConfig

    path, module = model
    profile = json.loads(tf.saved_model.load(path).quality_profile.numpy())
    K = profile["code_length"]
    assert profile["k"] == list(range(1, K + 1)) and K == int(module.code_length)
    assert len(profile["psnr_mean"]) == len(profile["pixel_fd"]) == K
    config = PipelineConfig.from_dict(json.load(open(os.path.join(finished_run, "run.json")))
                                      ["config"])
    test = np.concatenate(list(config.data.image_batches("test", sample=512)))
    assert profile["test_images"] == len(test)
    errors = _prefix_errors(module, test)
    np.testing.assert_allclose(profile["mse_mean"], errors.mean(axis=0), rtol=1e-4, atol=1e-7)
    psnr = 10 * np.log10(1 / errors)
    np.testing.assert_allclose(profile["psnr_p5"], np.percentile(psnr, 5, axis=0), atol=2e-3)
    assert profile["pixel_fd_floor"] > 0 and set(profile["seconds"]) == {"1", "16", "64"}
    assert all(s > 0 for curve in profile["seconds"].values() for s in curve["seconds"])
    report = stages.artifact_path(finished_run, "report")
    assert os.path.getsize(os.path.join(report, "quality_profile.png")) > 5000
    assert "quality_profile.png" in open(os.path.join(report, "report.md")).read()


def test_a_classifier_gives_the_profile_its_domain_fd(finished_run, tmp_path):
    import json

    import tensorflow as tf

    from ordered_vqvae import metrics
    from pipeline import stages
    from pipeline.config import PipelineConfig

    test_x, test_y, _ = sources.to_numpy(sources.load("digits", "test")[0])
    shape = test_x.shape[1:]
    clf = metrics.DomainClassifier(shape, 10)
    clf.fit(test_x, test_y, test_x, test_y, epochs=1)
    clf.save(str(tmp_path / "classifier"))
    metrics.DomainClassifier((16, 16, 3), 10).save(str(tmp_path / "colour"))
    run = copy_run(finished_run, tmp_path / "wd")
    for bad, message in (("colour", "takes 16x16x3 images, not 8x8x1"),
                         ("nothing", "holds no classifier.json")):
        assert message in ovqvae("export", f"--workdir={run}",
                                 f"--classifier={tmp_path / bad}", check_rc=1).stderr
    ovqvae("export", f"--workdir={run}", f"--classifier={tmp_path / 'classifier'}", check_rc=0)
    path = stages.artifact_path(run, "export")
    module = tf.saved_model.load(path)
    profile = json.loads(module.quality_profile.numpy())
    K = profile["code_length"]
    assert len(profile["domain_fd"]) == K and profile["domain_fd_floor"] > 0
    # Against the same FD computed here from the SavedModel's own samples and test images.
    config = PipelineConfig.from_dict(json.load(open(os.path.join(run, "run.json")))["config"])
    test = np.concatenate(list(config.data.image_batches("test", sample=512)))
    codes = module.sample(tf.constant(256), tf.constant(K), tf.constant(config.seed),
                          tf.constant(1.0))["codes"]
    for k in (1, K):
        images = module.decode_at(codes, tf.fill([256], k))["images"].numpy()
        want = metrics.frechet_distance_of(clf.features(images), clf.features(test))
        np.testing.assert_allclose(profile["domain_fd"][k - 1], want, rtol=1e-3, atol=1e-4)


def test_fd_ratio_floors_use_the_domain_fd_where_the_profile_has_it():
    from pipeline.profile import codes_for

    pixel = {"k": [1, 2, 3, 4], "psnr_mean": [10, 12, 13, 14], "code_length": 4,
             "pixel_fd": [4.0, 1.1, 1.0, 1.0]}
    assert codes_for(pixel, {"fd_ratio": 1.2}) == 2
    both = dict(pixel, domain_fd=[9.0, 5.0, 2.2, 2.0], domain_fd_floor=0.1)
    assert codes_for(both, {"fd_ratio": 1.2}) == 3
    assert codes_for(both, {"fd_ratio": 2.6}) == 2 and codes_for(both, {"psnr": 12.5}) == 3
