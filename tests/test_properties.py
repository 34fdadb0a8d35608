"""Property tests (Hypothesis) of the shape and index logic: quantizer, truncation, training
stream and sampler, each against NumPy over drawn shapes and sizes."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ordered_vqvae import configs, models
from ordered_vqvae.prior import CodePrior
from ordered_vqvae.quantizer import VectorQuantizer
from ordered_vqvae.generator import ImageGenerator
from ordered_vqvae.sampler import FILL_CODE
from ordered_vqvae.training import TrainingData
from ordered_vqvae.truncation import DISTRIBUTIONS, NestedTruncation

SETTINGS = settings(max_examples=25, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=3), dim=st.integers(1, 6),
       size=st.integers(2, 9), seed=st.integers(0, 2**16), masked=st.booleans())
def test_quantizer_picks_the_numpy_nearest_codeword_for_any_shape(lead, dim, size, seed, masked):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*lead, dim)).astype(np.float32)
    mask = (rng.random(lead) < 0.6).astype(np.float32) if masked else None
    vq = VectorQuantizer(size, dim, beta=0.5, seed=seed)
    vq.build(x.shape)
    codebook = rng.normal(size=(size, dim)).astype(np.float32)
    vq.codebook.assign(codebook)
    out = vq(x, loss_mask=mask)

    flat = x.reshape(-1, dim)
    want = np.argmin(((flat[:, None] - codebook[None]) ** 2).sum(-1), axis=1).reshape(lead)
    assert out["indices"].shape == tuple(lead) and out["quantized"].shape == x.shape
    np.testing.assert_array_equal(out["indices"].numpy(), want)
    np.testing.assert_allclose(out["quantized"].numpy(), codebook[want], rtol=1e-6)
    weights = np.ones(lead) if mask is None else mask
    err = ((x - codebook[want]) ** 2).mean(-1)
    expected = (err * weights).sum() / max(weights.sum(), 1.0)
    np.testing.assert_allclose(float(out["codebook_loss"]), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(out["commitment_loss"]), 0.5 * expected, rtol=1e-4, atol=1e-6)
    assert 1.0 - 1e-4 <= float(out["perplexity"]) <= size + 1e-4 or weights.sum() == 0
    used = np.unique(want[weights > 0]).size
    np.testing.assert_allclose(float(out["usage"]), used / size, rtol=1e-6)


@SETTINGS
@given(K=st.integers(1, 12), data=st.data(), distribution=st.sampled_from(DISTRIBUTIONS),
       fill=st.sampled_from(["zeros", "learned"]), n=st.integers(1, 6), dim=st.integers(1, 4),
       seed=st.integers(0, 2**30))
def test_truncation_keeps_exactly_the_first_k_and_fills_the_rest(K, data, distribution, fill,
                                                                n, dim, seed):
    min_codes = data.draw(st.integers(1, K))
    layer = NestedTruncation(K, distribution, min_codes=min_codes, fill=fill)
    tokens = np.random.default_rng(seed).normal(size=(n, K, dim)).astype(np.float32) + 5.0
    layer.build(tokens.shape)
    fill_value = np.zeros((K, dim), np.float32)
    if fill == "learned":
        fill_value = np.random.default_rng(seed + 1).normal(size=(K, dim)).astype(np.float32)
        layer.fill_value.assign(fill_value)

    p = layer.length_probabilities()
    assert p.shape == (K,) and abs(p.sum() - 1) < 1e-9 and (p[:min_codes - 1] == 0).all()
    keep = layer.keep_probabilities()
    assert keep[0] == pytest.approx(1.0) and (np.diff(keep) <= 1e-12).all()

    lengths = layer.sample_lengths(n, seed=tf.constant([seed, 7], tf.int32)).numpy()
    assert lengths.shape == (n,) and lengths.dtype == np.int32
    if distribution in ("none", "all"):
        assert (lengths == K).all()
    else:
        assert ((min_codes <= lengths) & (lengths <= K)).all()
    if distribution == "uniform":
        assert len(set(lengths.tolist())) == 1
    again = layer.sample_lengths(n, seed=tf.constant([seed, 7], tf.int32)).numpy()
    np.testing.assert_array_equal(again, lengths)  # A stateless seed fixes the draw.

    out, mask = layer.apply(tokens, lengths)
    kept = np.arange(K)[None] < lengths[:, None]
    np.testing.assert_array_equal(mask.numpy(), kept.astype(np.float32))
    want = np.where(kept[..., None], tokens, fill_value[None])
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-6)


@SETTINGS
@given(n=st.integers(4, 60), data=st.data(), seed=st.integers(0, 2**20))
def test_training_stream_shards_and_resumes_into_the_same_global_batches(n, data, seed):
    shards = data.draw(st.sampled_from([1, 2, 4]))
    batch = shards * data.draw(st.integers(1, max(1, n // (2 * shards))))
    examples = np.arange(n, dtype=np.int32)
    stream = TrainingData(examples, batch, seed,
                          side=lambda s, b: {"lengths": tf.fill([b], tf.cast(s[1], tf.int32))})
    spe = stream.steps_per_epoch
    assert spe == n // batch
    full = list(stream.dataset(0, 3).as_numpy_iterator())
    assert len(full) == 3 * spe
    for e in range(3):  # Each epoch: distinct examples, a fresh order, step-tagged extras.
        epoch = np.concatenate([b["image"] for b in full[e * spe:(e + 1) * spe]])
        assert len(set(epoch.tolist())) == spe * batch
        assert all((b["lengths"] == e * spe + i).all()
                   for i, b in enumerate(full[e * spe:(e + 1) * spe]))
    skip = data.draw(st.integers(0, 3 * spe - 1))
    first = skip // spe
    resumed = list(stream.dataset(first, 3, skip=skip - first * spe).as_numpy_iterator())
    assert len(resumed) == 3 * spe - skip
    for got, want in zip(resumed, full[skip:]):
        np.testing.assert_array_equal(got["image"], want["image"])
    per_replica = data.draw(st.sampled_from(sorted({batch // shards, max(1, batch // shards // 2)})))
    if (batch // shards) % per_replica:
        return
    parts = [list(stream.dataset(0, 1, shard=s, num_shards=shards,
                                 per_replica=per_replica).as_numpy_iterator())
             for s in range(shards)]
    replicas = (batch // shards) // per_replica
    for step in range(spe):
        pieces = [parts[s][step * replicas + r]["image"]
                  for s in range(shards) for r in range(replicas)]
        np.testing.assert_array_equal(np.concatenate(pieces), full[step]["image"])


K, V = 6, 16


@pytest.fixture(scope="module")
def sampler():
    ae = models.OrderedVQVAE(configs.preset("digits", hidden=(16,), latent_channels=K,
                                            codebook_size=V, fill="learned"))
    ae(tf.zeros((1, 8, 8, 1)))
    prior = CodePrior(K, V, num_layers=1, num_heads=2, width=16, ffn_width=32, dropout=0.0)
    prior(tf.zeros((1, K), tf.int32))
    return ImageGenerator(prior, ae)


@SETTINGS
@given(num=st.sampled_from([1, 3]), data=st.data(), seed=st.integers(0, 2**20))
def test_sampler_shapes_fill_and_fixed_prefix_for_any_k(sampler, num, data, seed):
    k = data.draw(st.integers(1, K))
    fixed = data.draw(st.integers(0, k))
    prefix = np.random.default_rng(seed).integers(0, V, size=(num, K))
    images, codes = sampler.complete(prefix, fixed, num_codes=k, seed=seed)
    codes = codes.numpy()
    assert codes.shape == (num, K) and images.shape == (num, 8, 8, 1)
    assert ((0 <= codes) & (codes < V)).all() and (codes[:, k:] == FILL_CODE).all()
    np.testing.assert_array_equal(codes[:, :fixed], prefix[:, :fixed])
    images = images.numpy()
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    np.testing.assert_allclose(images, sampler.autoencoder.decode(codes, k).numpy(), atol=1e-5)
    bad = data.draw(st.sampled_from([0, K + 1, -1]))
    with pytest.raises(ValueError, match=f"num_codes={bad}"):
        sampler.sample(num, bad, seed=seed)
