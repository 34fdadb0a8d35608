"""NestedTruncation: exact masks, length distributions, fill values, k validation."""

import numpy as np
import pytest
import tensorflow as tf

from ordered_vqvae.truncation import NestedTruncation


def _layer(k=6, **kw):
    layer = NestedTruncation(k, **kw)
    layer.build((None, k, 2))
    return layer


def _sample(layer, n=20000):
    tokens = tf.ones((n, layer.code_length, 2))
    _, mask = layer(tokens, training=True)
    mask = mask.numpy()
    lengths = mask.sum(axis=1).astype(int)
    # Every mask row is exactly a prefix of ones followed by zeros.
    expected = (np.arange(layer.code_length)[None, :] < lengths[:, None]).astype(np.float32)
    np.testing.assert_array_equal(mask, expected)
    return lengths


@pytest.mark.parametrize("distribution,min_codes", [
    ("uniform_per_example", 1), ("uniform_per_example", 3), ("geometric", 2)])
def test_per_example_distributions_match_their_probabilities(distribution, min_codes):
    layer = _layer(6, distribution=distribution, min_codes=min_codes, geometric_p=0.3)
    lengths = _sample(layer)
    assert lengths.min() >= min_codes and lengths.max() <= 6
    freq = np.bincount(lengths, minlength=7)[1:] / len(lengths)
    np.testing.assert_allclose(freq, layer.length_probabilities(), atol=0.015)
    if distribution == "geometric":
        p = np.array([0, 1, 0.7, 0.49, 0.343, 0.2401])
        np.testing.assert_allclose(layer.length_probabilities(), p / p.sum(), rtol=1e-6)


def test_a_full_code_share_mixes_k_equal_K_into_the_draw():
    layer = _layer(6, distribution="uniform_per_example", min_codes=2, full_code_share=0.4)
    expected = [0, 0.12, 0.12, 0.12, 0.12, 0.4 + 0.12]  # 0.6 x uniform over 2..6, + 0.4 at K.
    np.testing.assert_allclose(layer.length_probabilities(), expected, rtol=1e-6)
    freq = np.bincount(_sample(layer), minlength=7)[1:] / 20000
    np.testing.assert_allclose(freq, expected, atol=0.015)
    np.testing.assert_allclose(layer.keep_probabilities(), [1, 1, 0.88, 0.76, 0.64, 0.52])
    for bad, distribution in ((1.0, "uniform"), (-0.1, "uniform")):
        with pytest.raises(ValueError, match=f"full_code_share={bad}, expected 0.0 <= "):
            NestedTruncation(6, distribution=distribution, full_code_share=bad)
    # "none" keeps K whatever the share; "all" weighs its prefixes by these probabilities.
    np.testing.assert_allclose(_layer(6, distribution="none", full_code_share=0.2)
                               .length_probabilities(), [0, 0, 0, 0, 0, 1])
    np.testing.assert_allclose(_layer(4, distribution="all", full_code_share=0.2)
                               .length_probabilities(), [0.2, 0.2, 0.2, 0.4])


def test_a_length_power_tilts_the_draw_toward_long_prefixes():
    layer = _layer(4, distribution="uniform_per_example", length_power=1.0)
    np.testing.assert_allclose(layer.length_probabilities(), [0.1, 0.2, 0.3, 0.4], rtol=1e-6)
    freq = np.bincount(_sample(layer), minlength=5)[1:] / 20000
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.015)
    np.testing.assert_allclose(layer.keep_probabilities(), [1, 0.9, 0.7, 0.4])
    # With min_codes, a full-code share and the other distributions: k^a times their P(k).
    np.testing.assert_allclose(
        _layer(4, distribution="all", min_codes=2, length_power=2.0, full_code_share=0.5)
        .length_probabilities(), [0, 0.5 * 4 / 29, 0.5 * 9 / 29, 0.5 * 16 / 29 + 0.5])
    p = np.array([1, 2 * 0.5, 3 * 0.25])
    np.testing.assert_allclose(_layer(3, distribution="geometric", geometric_p=0.5,
                                      length_power=1.0).length_probabilities(), p / p.sum())
    for bad in (-1.0, float("nan"), 17.0):
        with pytest.raises(ValueError, match=f"length_power={bad}, expected 0.0 <= "):
            NestedTruncation(4, length_power=bad)


def test_uniform_draws_one_length_per_batch_and_covers_the_range():
    layer = _layer(5, distribution="uniform", min_codes=2)
    seen = set()
    for _ in range(60):
        lengths = _sample(layer, n=8)
        assert len(set(lengths.tolist())) == 1
        seen.add(int(lengths[0]))
    assert seen == {2, 3, 4, 5}


def test_none_and_all_keep_every_code_in_call():
    for distribution in ("none", "all"):
        assert set(_sample(_layer(4, distribution=distribution), n=50).tolist()) == {4}
    layer = _layer(5, distribution="all", min_codes=2)
    assert layer.prefix_lengths() == [2, 3, 4, 5]
    np.testing.assert_allclose(layer.keep_probabilities(), [1, 1, 0.75, 0.5, 0.25])
    np.testing.assert_allclose(_layer(4).keep_probabilities(), [1, 0.75, 0.5, 0.25])


def test_inference_uses_num_codes_and_fill_values():
    tokens = tf.reshape(tf.range(1, 13, dtype=tf.float32), (2, 3, 2))
    zeros = _layer(3, distribution="uniform")
    out, mask = zeros(tokens, num_codes=2)
    np.testing.assert_array_equal(out.numpy()[:, 2], 0.0)
    np.testing.assert_array_equal(out.numpy()[:, :2], tokens.numpy()[:, :2])
    np.testing.assert_array_equal(mask.numpy(), [[1, 1, 0], [1, 1, 0]])
    out, _ = zeros(tokens)  # Inference default: all K.
    np.testing.assert_array_equal(out.numpy(), tokens.numpy())

    learned = _layer(3, fill="learned")
    fill = np.array([[9, 9], [8, 8], [7, 7]], np.float32)
    learned.fill_value.assign(fill)
    out, _ = learned(tokens, num_codes=1)
    np.testing.assert_array_equal(out.numpy()[:, 0], tokens.numpy()[:, 0])
    np.testing.assert_array_equal(out.numpy()[:, 1:], np.broadcast_to(fill[1:], (2, 2, 2)))


def test_num_codes_out_of_range_and_bad_arguments():
    layer = _layer(4)
    tokens = tf.ones((1, 4, 2))
    for bad in (0, 5, -1):
        with pytest.raises(ValueError, match=f"num_codes={bad}, expected 1 <= num_codes <= 4"):
            layer(tokens, num_codes=bad)
    with pytest.raises(tf.errors.InvalidArgumentError, match="1 <= num_codes <= 4"):
        layer(tokens, num_codes=tf.constant(9))
    with pytest.raises(ValueError, match="distribution='poisson'"):
        NestedTruncation(4, distribution="poisson")
    with pytest.raises(ValueError, match="min_codes=5"):
        NestedTruncation(4, min_codes=5)
    with pytest.raises(ValueError, match="fill='mean'"):
        NestedTruncation(4, fill="mean")


def test_config_round_trip():
    layer = NestedTruncation(7, distribution="geometric", min_codes=2, geometric_p=0.2,
                             fill="learned", seed=4, full_code_share=0.25, length_power=1.5,
                             name="t")
    assert NestedTruncation.from_config(layer.get_config()).get_config() == layer.get_config()
