"""Frechet distance against closed forms; the domain classifier on real digits."""

import json

import numpy as np
import pytest

from ordered_vqvae import metrics
from pipeline import sources


def test_identical_sets_have_zero_distance():
    x = np.random.default_rng(0).normal(size=(500, 6))
    assert metrics.frechet_distance_of(x, x) == pytest.approx(0.0, abs=1e-6)


def test_gaussians_match_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    # Commuting (diagonal) covariances: Tr term is sum (sqrt(a) - sqrt(b))^2.
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # A general pair against an independent formula: Tr(S1 + S2 - 2 (S2^1/2 S1 S2^1/2)^1/2).
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    s1, s2 = a @ a.T + np.eye(3), b @ b.T + np.eye(3)
    w, v = np.linalg.eigh(s2)
    root2 = v @ np.diag(np.sqrt(w)) @ v.T
    w, v = np.linalg.eigh(root2 @ s1 @ root2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.sum(np.sqrt(w))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    # Large samples from the two Gaussians approach the closed form.
    x = rng.multivariate_normal(mu1, s1, 200_000)
    y = rng.multivariate_normal(mu2, s2, 200_000)
    assert metrics.frechet_distance_of(x, y) == pytest.approx(expected, rel=0.03)


def test_singular_and_non_finite_statistics():
    # Rank-deficient covariances (fewer samples than dimensions) still give the exact value.
    rng = np.random.default_rng(2)
    a = rng.normal(size=(6, 2))
    s1, s2 = a @ a.T, 2.0 * a @ a.T  # Rank 2 in 6 dimensions, commuting.
    expected = np.trace(s1) + np.trace(s2) - 2 * np.trace(np.sqrt(2.0) * s1)
    assert metrics.frechet_distance(np.zeros(6), s1, np.zeros(6), s2) == pytest.approx(
        expected, abs=1e-6)
    with pytest.raises(FloatingPointError, match="sigma2 holds NaN or Inf"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.full((2, 2), np.nan))
    with pytest.raises(FloatingPointError, match="mu1 holds NaN or Inf"):
        metrics.frechet_distance(np.array([np.inf, 0.0]), np.eye(2), np.zeros(2), np.eye(2))


def test_bad_statistics_are_rejected():
    with pytest.raises(ValueError, match=r"shape \(1, 3\), expected \[N >= 2, D\]"):
        metrics.statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="mismatched statistics"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        metrics.InceptionFeatures("/nonexistent/inception.h5")


def test_domain_classifier_separates_real_digits_from_noise(tmp_path):
    train, ytr, _ = sources.to_numpy(sources.load("digits", "train")[0])
    test, yte, _ = sources.to_numpy(sources.load("digits", "test")[0])
    clf = metrics.DomainClassifier((8, 8, 1), 10)
    accuracy = clf.fit(train, ytr, test, yte, epochs=15)
    assert accuracy > 0.9
    real = clf.features(test)
    same = metrics.frechet_distance_of(real[:170], real[170:340])
    noise = metrics.frechet_distance_of(real, clf.features(
        np.random.default_rng(0).uniform(size=test.shape).astype(np.float32)))
    assert noise > 10 * same
    clf.save(str(tmp_path / "clf"))
    again = metrics.DomainClassifier.load(str(tmp_path / "clf"), (8, 8, 1))
    np.testing.assert_allclose(again.features(test[:5]), real[:5], atol=1e-5)
    assert again.accuracy == accuracy
    # Scored again: Keras's own accuracy from `fit` on the same images, chance on shifted labels.
    rescored, features = again.evaluate(test, yte)
    assert rescored == pytest.approx(accuracy, abs=1e-6)
    np.testing.assert_allclose(features, real, atol=1e-5)  # The same pass gives the features.
    assert again.evaluate(test, (yte + 1) % 10)[0] < 0.2 and again.accuracy < 0.2


def test_resnet_classifier_learns_colour_images_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)  # The class is the channel that is brighter.
    x = (rng.uniform(0, 0.6, (600, 16, 16, 3)) + 0.3 * np.eye(3)[y][:, None, None]).astype(np.float32)
    clf = metrics.DomainClassifier((16, 16, 3), 3)
    assert clf.architecture == "resnet"
    accuracy = clf.fit(x[:500], y[:500], x[500:], y[500:], epochs=4, batch_size=50)
    assert accuracy > 0.9
    features = clf.features(x[500:])  # Inference: no flips or shifts, the same each call.
    np.testing.assert_array_equal(clf.features(x[500:]), features)
    clf.save(str(tmp_path / "clf"))
    again = metrics.DomainClassifier.load(str(tmp_path / "clf"), (16, 16, 3))
    assert again.architecture == "resnet" and again.accuracy == accuracy
    assert again.num_classes == 3
    # A file from before the number was recorded: the logits' width in the weights gives it.
    path = tmp_path / "clf" / metrics.CLASSIFIER_JSON
    path.write_text(json.dumps({"architecture": "resnet", "accuracy": accuracy}))
    assert metrics.DomainClassifier.load(str(tmp_path / "clf"), (16, 16, 3)).num_classes == 3
    np.testing.assert_allclose(again.features(x[500:]), features, atol=1e-5)
    with pytest.raises(ValueError, match="architecture='vgg'"):
        metrics.DomainClassifier((16, 16, 3), 3, architecture="vgg")


def test_inception_features_load_from_a_local_weights_file(tmp_path):
    """The FID path with a local file (random weights here: nothing may be downloaded)."""
    import keras

    path = str(tmp_path / "inception_notop.weights.h5")
    keras.applications.InceptionV3(include_top=False, weights=None, pooling="avg",
                                   input_shape=(299, 299, 3)).save_weights(path)
    features = metrics.InceptionFeatures(path).features(
        np.random.default_rng(0).uniform(size=(3, 8, 8, 1)).astype(np.float32))
    assert features.shape == (3, 2048) and np.isfinite(features).all()
