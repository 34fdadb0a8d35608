"""The fused batch normalization against Keras' own layer."""

import os

import keras
import numpy as np
import tensorflow as tf

from ordered_vqvae.normalization import BatchNormalization


def _pair(shape=(6, 5, 4, 3)):
    ours, theirs = BatchNormalization(momentum=0.9), keras.layers.BatchNormalization(
        momentum=0.9, synchronized=True)
    for layer in (ours, theirs):
        layer.build(shape)
    rng = np.random.default_rng(0)
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        value = rng.uniform(0.5, 1.5, size=shape[-1]).astype(np.float32)
        getattr(ours, name).assign(value)
        getattr(theirs, name).assign(value)
    return ours, theirs


def test_training_step_matches_keras():
    ours, theirs = _pair()
    x = tf.constant(np.random.default_rng(1).normal(2.0, 3.0, size=(6, 5, 4, 3)), tf.float32)
    upstream = tf.constant(np.random.default_rng(2).normal(size=x.shape), tf.float32)
    before = ours.moving_mean.numpy().copy()
    results = []
    for layer in (ours, theirs):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * upstream)
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append([y, *grads, layer.moving_mean, layer.moving_variance])
    # Outputs, gradients (input, gamma, beta) and the moving statistics after one update.
    for a, b in zip(*results):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    # The update moved the statistics: 0.9 * old + 0.1 * the batch mean.
    batch_mean = tf.reduce_mean(x, axis=[0, 1, 2]).numpy()
    np.testing.assert_allclose(ours.moving_mean.numpy(), 0.9 * before + 0.1 * batch_mean,
                               rtol=1e-5)


def test_inference_and_bfloat16_take_keras_path():
    ours, theirs = _pair()
    x = tf.random.normal((2, 5, 4, 3))
    np.testing.assert_allclose(ours(x, training=False), theirs(x, training=False), atol=1e-6)
    assert not ours._fused(tf.cast(x, tf.bfloat16), True)
    assert not ours._fused(x, False)
    assert ours._fused(x, True)


def test_weights_interchange_with_keras_layer(tmp_path):
    def model(layer_cls):
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Conv2D(3, 3),
                                 layer_cls(synchronized=True)])

    theirs = model(keras.layers.BatchNormalization)
    x = tf.random.normal((8, 4, 4, 2))
    theirs(x, training=True)  # Moving statistics away from their initial values.
    path = os.path.join(tmp_path, "w.weights.h5")
    theirs.save_weights(path)
    ours = model(BatchNormalization)
    ours.load_weights(path)
    assert ours.layers[-1].name.startswith("batch_normalization")
    np.testing.assert_allclose(ours(x, training=False), theirs(x, training=False), atol=1e-6)
