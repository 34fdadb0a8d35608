"""VectorQuantizer: NumPy reference, straight-through gradient, losses, EMA, restarts, config."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ordered_vqvae.quantizer import VectorQuantizer, straight_through


def _layer(num=8, dim=3, **kw):
    layer = VectorQuantizer(num, dim, **kw)
    layer.build((None, dim))
    return layer


def test_indices_match_numpy_nearest_neighbour():
    rng = np.random.default_rng(0)
    layer = _layer(16, 5)
    codebook = rng.normal(size=(16, 5)).astype(np.float32)
    layer.codebook.assign(codebook)
    x = rng.normal(size=(4, 7, 5)).astype(np.float32)
    out = layer(x)
    ref = np.argmin(((x[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
    np.testing.assert_array_equal(out["indices"].numpy(), ref)
    assert out["indices"].dtype == tf.int32 and out["quantized"].shape == (4, 7, 5)
    np.testing.assert_allclose(out["quantized"].numpy(), codebook[ref], atol=1e-6)
    np.testing.assert_allclose(layer.lookup(ref).numpy(), codebook[ref], atol=1e-6)
    dist = layer.distances(tf.reshape(x, [-1, 5])).numpy()
    np.testing.assert_allclose(dist, ((x.reshape(-1, 1, 5) - codebook) ** 2).sum(-1), atol=1e-4)


def test_straight_through_gradient_is_identity_for_inputs():
    layer = _layer(8, 3)
    layer.codebook.assign(np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32))
    x = tf.constant(np.random.default_rng(2).normal(size=(6, 3)).astype(np.float32))
    w = tf.constant(np.random.default_rng(3).normal(size=(6, 3)).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        out = layer(x)
        y = tf.reduce_sum(out["quantized"] * w)
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), w.numpy(), atol=1e-7)
    # The codebook learns only from its loss term, not through the straight-through path.
    through = tape.gradient(y, layer.codebook)
    assert through is None or not np.any(tf.convert_to_tensor(through).numpy())
    assert np.any(tf.convert_to_tensor(tape.gradient(out["codebook_loss"], layer.codebook)).numpy())
    a, b = tf.constant([1.0, 2.0]), tf.constant([5.0, 7.0])
    with tf.GradientTape() as tape:
        tape.watch([a, b])
        out = straight_through(a, b)
    np.testing.assert_array_equal(out.numpy(), [5.0, 7.0])
    ga, gb = tape.gradient(out, [a, b])
    np.testing.assert_array_equal(ga.numpy(), [1.0, 1.0])
    np.testing.assert_array_equal(gb.numpy(), [0.0, 0.0])


def test_losses_and_statistics_hand_computed():
    layer = _layer(2, 1, beta=0.25)
    layer.codebook.assign([[0.0], [1.0]])
    out = layer(tf.constant([[0.2], [0.9]]))
    # Squared errors 0.04 and 0.01: mean 0.025.
    np.testing.assert_allclose(out["codebook_loss"].numpy(), 0.025, rtol=1e-5)
    np.testing.assert_allclose(out["commitment_loss"].numpy(), 0.25 * 0.025, rtol=1e-5)
    np.testing.assert_allclose(out["loss"].numpy(), 1.25 * 0.025, rtol=1e-5)
    np.testing.assert_allclose(out["perplexity"].numpy(), 2.0, rtol=1e-5)
    np.testing.assert_allclose(out["usage"].numpy(), 1.0)
    masked = layer(tf.constant([[0.2], [0.9]]), loss_mask=tf.constant([1.0, 0.0]))
    np.testing.assert_allclose(masked["codebook_loss"].numpy(), 0.04, rtol=1e-5)
    np.testing.assert_allclose(masked["perplexity"].numpy(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(masked["usage"].numpy(), 0.5)


def test_ema_updates_only_in_training_and_match_formula():
    layer = _layer(2, 1, use_ema=True, ema_decay=0.5, epsilon=0.0)
    layer.codebook.assign([[0.0], [1.0]])
    before = layer.codebook.numpy().copy()
    assert not layer.codebook.trainable
    x = tf.constant([[0.2], [0.4], [0.9]])
    out = layer(x, training=False)
    np.testing.assert_array_equal(layer.codebook.numpy(), before)
    np.testing.assert_allclose(out["codebook_loss"].numpy(), 0.0)
    layer(x, training=True)
    # cluster sizes: 0.5 * [2, 1] = [1, .5]; sums: 0.5 * [0.6, 0.9] = [.3, .45].
    np.testing.assert_allclose(layer.codebook.numpy(), [[0.3], [0.9]], rtol=1e-5)


def test_dead_codes_are_restarted_from_batch_vectors():
    layer = _layer(4, 2, dead_code_steps=2)
    layer.codebook.assign([[0.0, 0.0], [100.0, 100.0], [200.0, 200.0], [-300.0, 5.0]])
    x = tf.constant([[0.1, 0.0], [0.0, 0.2], [0.3, 0.1]])
    first = layer(x, training=True)
    assert float(first["restarted"]) == 0.0
    second = layer(x, training=True)
    assert float(second["restarted"]) == 3.0
    codebook = layer.codebook.numpy()
    np.testing.assert_array_equal(codebook[0], [0.0, 0.0])
    for row in codebook[1:]:
        assert any(np.allclose(row, v) for v in x.numpy())
    np.testing.assert_array_equal(layer.steps_unused.numpy(), [0, 0, 0, 0])


def test_config_round_trip_and_serialization():
    layer = VectorQuantizer(32, 7, beta=0.5, use_ema=True, ema_decay=0.9, dead_code_steps=5,
                            seed=3, name="vq")
    clone = VectorQuantizer.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(again, VectorQuantizer) and again.get_config() == layer.get_config()


def test_bad_arguments_and_shapes():
    with pytest.raises(ValueError, match="codebook_size=1, expected a codebook of >= 2 codewords"):
        VectorQuantizer(1, 4)
    with pytest.raises(ValueError, match="ema_decay=1.5"):
        VectorQuantizer(4, 4, ema_decay=1.5)
    layer = VectorQuantizer(4, 3)
    with pytest.raises(ValueError, match="embedding_dim=3"):
        layer(tf.zeros((2, 5)))
    empty = _layer(4, 3)(tf.zeros((0, 3)))
    assert empty["quantized"].shape == (0, 3) and empty["indices"].shape == (0,)
