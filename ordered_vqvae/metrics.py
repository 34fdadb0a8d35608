"""Sample-quality metrics: Frechet distances on classifier or InceptionV3 features.

- `frechet_distance`: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) (Heusel et al., 2017).
- `DomainClassifier`: a classifier trained on the dataset's own labels (a small CNN, or a
  small ResNet with flips and crops for colour images); the features of its penultimate
  layer give a domain Frechet distance that works offline on any labelled dataset (its
  test accuracy says how much to trust them).
- `InceptionFeatures`: FID's InceptionV3 pool features, only from a local weights file:
  nothing is downloaded. Without one, FID is reported as unavailable.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from ordered_vqvae.atomic import write_json
from ordered_vqvae.normalization import BatchNormalization


CLASSIFIER_JSON = "classifier.json"


def statistics(features: np.ndarray):
    """(mean [D], covariance [D, D]) of features [N, D] (N >= 2)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features have shape {features.shape}, expected [N >= 2, D]")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance matrix (eigenvalues below 0 from round-off
    count as 0)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.maximum(w, 0.0))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    The trace term Tr((S1 S2)^1/2) is the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix S1^1/2 S2 S1^1/2, which has the same spectrum as S1 S2: no general
    matrix square root, no imaginary parts to drop. Raises FloatingPointError when the
    statistics or the result are not finite.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"mismatched statistics: means {mu1.shape} vs {mu2.shape}, "
                         f"covariances {sigma1.shape} vs {sigma2.shape}")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise FloatingPointError(f"{name} holds NaN or Inf; the features are not finite")
    root1 = _psd_sqrt(sigma1)
    product = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    trace_sqrt = np.sqrt(np.maximum(eigenvalues, 0.0)).sum()
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    if not np.isfinite(distance):
        raise FloatingPointError(f"the Frechet distance is {distance}, expected a finite number")
    return distance


def frechet_distance_of(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*statistics(features_a), *statistics(features_b))


ARCHITECTURES = ("cnn", "resnet")


def _cnn(x):
    """Two 3x3 convolutions with max pooling (grayscale digits: 99% on MNIST)."""
    for width in (32, 64):
        x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
        if min(x.shape[1:3]) >= 4:
            x = keras.layers.MaxPooling2D()(x)
    return keras.layers.Flatten()(x)


def _resnet(x, widths=(32, 64, 128)):
    """Random flips and shifts of up to 4 pixels, zero-filled (the usual pad-4-and-crop;
    training only), then a ResNet of one basic block per stage (3x3 convolutions, batch
    norm) and global average pooling."""
    height, width = x.shape[1:3]
    x = keras.layers.RandomFlip("horizontal")(x)
    x = keras.layers.RandomTranslation(4 / height, 4 / width, fill_mode="constant",
                                       interpolation="nearest")(x)

    def conv_bn(x, width, stride=1):
        x = keras.layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False)(x)
        return BatchNormalization(synchronized=False)(x)

    x = keras.layers.ReLU()(conv_bn(x, widths[0]))
    for stage, width in enumerate(widths):
        stride = 1 if stage == 0 else 2
        y = conv_bn(keras.layers.ReLU()(conv_bn(x, width, stride)), width)
        if stride != 1 or x.shape[-1] != width:
            x = BatchNormalization(synchronized=False)(
                keras.layers.Conv2D(width, 1, strides=stride, use_bias=False)(x))
        x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    return keras.layers.GlobalAveragePooling2D()(x)


class DomainClassifier:
    """A classifier whose penultimate layer gives features for a domain FD.

    `architecture`: "cnn" (small, fast; grayscale digits) or "resnet" (flips and crops;
    colour images such as CIFAR-10); "auto" picks "resnet" for 3 channels.
    """

    def __init__(self, image_shape, num_classes: int, feature_dim: int = 128, seed: int = 0,
                 architecture: str = "auto"):
        if architecture == "auto":
            architecture = "resnet" if image_shape[-1] == 3 else "cnn"
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={architecture!r}, expected 'auto' or one of "
                             f"{ARCHITECTURES}")
        self.architecture = architecture
        self.num_classes = int(num_classes)
        keras.utils.set_random_seed(seed)
        inputs = keras.Input(image_shape)
        x = (_cnn if architecture == "cnn" else _resnet)(inputs)
        features = keras.layers.Dense(feature_dim, activation="relu", name="features")(x)
        logits = keras.layers.Dense(num_classes, name="logits")(keras.layers.Dropout(0.3)(features))
        self.model = keras.Model(inputs, logits)
        self.features_model = keras.Model(inputs, features)
        self._both = keras.Model(inputs, [features, logits])
        self.accuracy: Optional[float] = None

    def fit(self, images, labels, test_images, test_labels, epochs: int = 3,
            batch_size: int = 128, verbose: int = 0) -> float:
        """Trains on labelled images (Adam, the learning rate on a cosine from 1e-3 to 0);
        returns (and keeps) the test accuracy."""
        steps = epochs * (len(images) // batch_size)
        schedule = keras.optimizers.schedules.CosineDecay(1e-3, max(steps, 1))
        self.model.compile(keras.optimizers.Adam(schedule),
                           keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                           metrics=["accuracy"])
        self.model.fit(images, labels, epochs=epochs, batch_size=batch_size, verbose=verbose,
                       shuffle=True)
        self.accuracy = float(self.model.evaluate(test_images, test_labels, verbose=0)[1])
        return self.accuracy

    def features(self, images, batch_size: int = 500) -> np.ndarray:
        return self.features_model.predict(np.asarray(images, np.float32), batch_size=batch_size,
                                           verbose=0)

    def save(self, directory: str) -> None:
        """Weights, then classifier.json (architecture, classes and test accuracy), written
        last."""
        os.makedirs(directory, exist_ok=True)
        self.model.save_weights(os.path.join(directory, "classifier.weights.h5"))
        write_json(os.path.join(directory, CLASSIFIER_JSON),
                   {"architecture": self.architecture, "num_classes": self.num_classes,
                    "accuracy": self.accuracy,
                    "image_shape": list(self.model.input_shape[1:])})

    def evaluate(self, images, labels, batch_size: int = 500) -> Tuple[float, np.ndarray]:
        """(accuracy, features) of labelled images from one pass; the accuracy is kept as
        `accuracy` (a cached classifier is scored again on whatever test set a run uses, whose
        features the FD needs too)."""
        features, logits = self._both.predict(np.asarray(images, np.float32),
                                              batch_size=batch_size, verbose=0)
        self.accuracy = float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))
        return self.accuracy, features

    @classmethod
    def load(cls, directory: str, image_shape) -> "DomainClassifier":
        """A classifier written by `save` (a classifier.json without num_classes gives it
        by the width of the logits)."""
        with open(os.path.join(directory, CLASSIFIER_JSON)) as f:
            saved = json.load(f)
        trained = saved.get("image_shape")  # Absent in classifiers saved before it was kept.
        if trained is not None and tuple(trained) != tuple(image_shape):
            raise ValueError(f"the classifier in {directory} takes "
                             f"{'x'.join(map(str, trained))} images, not "
                             f"{'x'.join(map(str, image_shape))}")
        weights = os.path.join(directory, "classifier.weights.h5")
        num_classes = saved.get("num_classes") or _logits_width(weights)
        clf = cls(image_shape, num_classes, architecture=saved["architecture"])
        clf.model.load_weights(weights)
        clf.accuracy = saved["accuracy"]
        return clf


def _logits_width(weights_path: str) -> int:
    """The number of outputs of the last Dense layer (the logits) in a Keras weights file,
    whose groups are named by layer class and creation order: dense, dense_1, ..."""
    import h5py

    with h5py.File(weights_path, "r") as f:
        names = [n for n in f["layers"] if n == "dense" or n.startswith("dense_")]
        last = max(names, key=lambda n: 0 if n == "dense" else int(n[len("dense_"):]))
        return int(f["layers"][last]["vars"]["1"].shape[0])


class InceptionFeatures:
    """InceptionV3 pool features (2048-d) from a local weights file, for FID."""

    def __init__(self, weights_path: str):
        if not weights_path or not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"InceptionV3 weights not found at {weights_path!r}: FID needs a local copy of "
                "the notop ImageNet weights (inception_v3_weights_tf_dim_ordering_tf_kernels_"
                "notop.h5); nothing is downloaded")
        self.model = keras.applications.InceptionV3(include_top=False, weights=weights_path,
                                                    pooling="avg", input_shape=(299, 299, 3))

    def features(self, images, batch_size: int = 64) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            x = tf.convert_to_tensor(images[start:start + batch_size], tf.float32)
            if x.shape[-1] == 1:
                x = tf.image.grayscale_to_rgb(x)
            x = tf.image.resize(x, (299, 299), method="bilinear")
            x = keras.applications.inception_v3.preprocess_input(x * 255.0)
            out.append(self.model(x, training=False).numpy())
        return np.concatenate(out)
