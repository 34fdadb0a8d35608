"""Ordered autoencoders: PCA recovery, the nested loss by hand, the VQ-VAE's API and errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ordered_vqvae import configs, models

TINY = configs.preset("digits", hidden=(8,), latent_channels=6, codebook_size=16)


def _pca_data(n=4000, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    stds = np.array([4.0, 3.0, 2.0, 1.2, 0.4, 0.3, 0.2, 0.1])[:dim]
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    x = (rng.normal(size=(n, dim)) * stds) @ basis.T
    return (x - x.mean(0)).astype(np.float32)


def _fit_linear(x, K, truncation):
    model = models.OrderedAutoencoder(input_dim=x.shape[1], code_length=K, linear=True,
                                      truncation=truncation)
    model.compile(keras.optimizers.Adam(0.02))
    ds = tf.data.Dataset.from_tensor_slices(x).batch(500).repeat()
    model.fit(ds, steps_per_epoch=400, epochs=3, verbose=0, shuffle=False)
    model.optimizer.learning_rate.assign(0.002)
    model.fit(ds, steps_per_epoch=400, epochs=1, verbose=0, shuffle=False)
    return model


def _cosines(model, pcs):
    dirs = model.decoder_directions()
    return [abs(d @ pc) / np.linalg.norm(d) for d, pc in zip(dirs, pcs)]


def test_linear_ordered_autoencoder_recovers_pca_in_order():
    x = _pca_data()
    K = 4
    cov = x.T @ x / len(x)
    eigvals, eigvecs = np.linalg.eigh(cov)
    pcs = eigvecs[:, ::-1].T  # Rows: principal directions by decreasing variance.

    model = _fit_linear(x, K, "all")
    for j, cos in enumerate(_cosines(model, pcs)):
        assert cos >= 0.98, f"decoder direction {j} has |cos| {cos:.3f} with PC {j}"
    for k in range(1, K + 1):
        recon = model.decode(model.encode(x), num_codes=k).numpy()
        err = np.mean(np.sum((x - recon) ** 2, axis=1))
        pca_err = eigvals[::-1][k:].sum()  # Variance left out by the best rank-k projection.
        assert err <= 1.05 * pca_err, f"k={k}: error {err:.4f} vs PCA {pca_err:.4f}"

    # Control: without nested truncation the subspace is right but the order is not.
    unordered = _fit_linear(x, K, "none")
    assert min(_cosines(unordered, pcs)) < 0.9
    full = unordered.decode(unordered.encode(x), num_codes=K).numpy()
    assert np.mean(np.sum((x - full) ** 2, axis=1)) <= 1.05 * eigvals[::-1][K:].sum()


def test_nested_loss_matches_hand_computation_for_every_objective():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    enc = rng.normal(size=(4, 3)).astype(np.float32)
    dec = rng.normal(size=(3, 4)).astype(np.float32)
    z = x @ enc

    def err(k):
        zk = z.copy()
        zk[:, k:] = 0.0
        return np.mean((x - zk @ dec) ** 2, axis=1)  # Per example.

    for chunk in (3, 2, 1):
        model = models.OrderedAutoencoder(input_dim=4, code_length=3, truncation="all", min_codes=1)
        model.encoder.layers[-1].kernel.assign(enc)
        model.decoder.layers[-1].kernel.assign(dec)
        model.prefix_chunk = chunk
        loss, recon, _ = model._nested_loss(tf.constant(x), training=True)
        expected = np.mean([err(k).mean() for k in (1, 2, 3)])
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
        np.testing.assert_allclose(float(recon), expected, rtol=1e-5)
        # A full-code share of 0.4 weighs the prefixes 0.2, 0.2 and 0.2 + 0.4.
        model.truncation.full_code_share = 0.4
        loss, _, _ = model._nested_loss(tf.constant(x), training=True)
        expected = 0.2 * err(1).mean() + 0.2 * err(2).mean() + 0.6 * err(3).mean()
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
        model.truncation.full_code_share = 0.0
    # A stage's objective comes with compile, and leaves the layer's own as configured:
    # "none" trains the full code only.
    model.compile(truncation="none")
    loss, _, _ = model._nested_loss(tf.constant(x), training=True)
    np.testing.assert_allclose(float(loss), err(3).mean(), rtol=1e-5)
    assert model.truncation.distribution == "all" and model.get_config()["truncation"] == "all"
    with pytest.raises(ValueError, match="truncation='geometrical'"):
        model.compile(truncation="geometrical")
    # Per-example uniform: each example's error at its own drawn k.
    model.compile(truncation="uniform_per_example")
    lengths = model.truncation.sample_lengths(5, distribution="uniform_per_example")
    model.truncation.sample_lengths = lambda batch, **_: lengths
    loss, _, _ = model._nested_loss(tf.constant(x), training=True)
    expected = np.mean([err(int(k))[i] for i, k in enumerate(lengths.numpy())])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # Evaluation: the full code.
    loss, _, _ = model._nested_loss(tf.constant(x), training=False)
    np.testing.assert_allclose(float(loss), err(3).mean(), rtol=1e-5)


def test_vqvae_loss_is_reconstruction_plus_masked_vq_terms():
    model = models.OrderedVQVAE(TINY.replace(truncation="uniform"))
    x = tf.random.stateless_uniform((4, 8, 8, 1), seed=(1, 2))
    lengths = tf.constant([3, 3, 3, 3])
    model.truncation.sample_lengths = lambda batch, **_: lengths
    loss, recon, aux = model._nested_loss(x, training=True)
    tokens = model._to_tokens(model.encoder(x * 2 - 1, training=True))
    vq = model.quantizer(tokens, loss_mask=model.truncation.keep_mask(lengths))
    cut, _ = model.truncation.apply(vq["quantized"], lengths)
    target = x * 2 - 1
    expected_recon = tf.reduce_mean(tf.square(target - model._decode_tokens(cut, training=True)))
    np.testing.assert_allclose(float(recon), float(expected_recon), rtol=1e-4)
    np.testing.assert_allclose(float(loss), float(expected_recon + vq["loss"]), rtol=1e-4)
    # Only the 3 kept tokens of each example count in the VQ terms.
    sq = tf.reduce_mean(tf.square(tokens - vq["quantized"]), -1)[:, :3]
    np.testing.assert_allclose(float(aux["codebook_loss"]), float(tf.reduce_mean(sq)), rtol=1e-4)


@pytest.mark.parametrize("quantization,K,D", [("channel", 6, 16), ("spatial", 16, 6)])
def test_vqvae_encode_decode_shapes_and_truncation(quantization, K, D):
    config = TINY.replace(quantization=quantization)
    assert (config.code_length, config.embedding_dim) == (K, D)
    model = models.OrderedVQVAE(config)
    x = tf.random.stateless_uniform((3, 8, 8, 1), seed=(0, 1))
    codes = model.encode(x)
    assert codes.shape == (3, K) and codes.dtype == tf.int32
    assert int(tf.reduce_min(codes)) >= 0 and int(tf.reduce_max(codes)) < 16
    images = model.decode(codes, num_codes=2)
    assert images.shape == (3, 8, 8, 1)
    assert float(tf.reduce_min(images)) >= 0.0 and float(tf.reduce_max(images)) <= 1.0
    # Codes beyond num_codes are ignored.
    other = tf.concat([codes[:, :2], (codes[:, 2:] + 5) % 16], axis=1)
    np.testing.assert_array_equal(model.decode(other, 2).numpy(), images.numpy())
    assert not np.array_equal(model.decode(other, K).numpy(), model.decode(codes, K).numpy())
    np.testing.assert_allclose(model.reconstruct(x).numpy(), model.decode(codes).numpy(), atol=1e-6)


def _last_encoder_conv(model):
    return model.encoder.layers[-1]


@pytest.mark.parametrize("fill", ["zeros", "learned"])
def test_truncated_codes_get_no_encoder_gradient_and_the_fill_learns(fill):
    """Channel j of the encoder's last convolution makes token j: with every example cut
    to k tokens, channels >= k get exactly zero gradient from the whole training loss, the
    kept ones do not; a learned fill gets gradient only where it fills in."""
    model = models.OrderedVQVAE(TINY.replace(fill=fill))
    x = tf.random.stateless_uniform((16, 8, 8, 1), seed=(5, 6))
    model(x)
    if fill == "learned":
        model.truncation.fill_value.assign(tf.random.normal(model.truncation.fill_value.shape, seed=7))
    k = 2
    conv = _last_encoder_conv(model)
    variables = [conv.kernel, conv.bias] + ([model.truncation.fill_value] if fill == "learned"
                                            else [])
    with tf.GradientTape() as tape:
        loss, _, _ = model._nested_loss(x, training=True, lengths=tf.fill([16], k))
    grads = tape.gradient(loss, variables)
    kernel, bias = np.abs(grads[0].numpy()), np.abs(grads[1].numpy())
    assert kernel[..., k:].max() == 0.0 and bias[k:].max() == 0.0
    assert kernel[..., :k].max() > 1e-6 and (bias[:k] > 0).all()
    if fill == "learned":
        fill_grad = np.abs(grads[2].numpy())
        assert fill_grad[:k].max() == 0.0 and (fill_grad[k:].max(axis=1) > 1e-6).all()


def test_token_j_of_the_channel_code_is_channel_j_quantized():
    model = models.OrderedVQVAE(TINY)
    x = tf.random.stateless_uniform((3, 8, 8, 1), seed=(8, 9))
    model(x)
    codes = model.encode(x).numpy()
    z = model.encoder(x * 2.0 - 1.0).numpy()  # [N, h, w, C]: the latent before quantization.
    codebook = model.quantizer.codebook.numpy()  # [V, h*w]
    n, h, w, c = z.shape
    assert codes.shape == (n, c) and codebook.shape[1] == h * w
    for j in range(c):
        vectors = z[..., j].reshape(n, h * w)  # Channel j's map, row-major.
        nearest = ((vectors[:, None] - codebook[None]) ** 2).sum(-1).argmin(1)
        np.testing.assert_array_equal(codes[:, j], nearest)


def test_zero_codes_are_rejected_not_read_as_all():
    model = models.OrderedVQVAE(TINY)
    x = tf.random.stateless_uniform((2, 8, 8, 1), seed=(1, 1))
    model(x)
    with pytest.raises(ValueError, match="num_codes=0, expected 1 <= num_codes <= 6"):
        model.reconstruct(x, 0)
    linear = models.OrderedAutoencoder(input_dim=5, code_length=3)
    with pytest.raises(ValueError, match="num_codes=0, expected 1 <= num_codes <= 3"):
        linear.decode(np.zeros((2, 3), np.float32), 0)
    np.testing.assert_allclose(model.reconstruct(x).numpy(), model.reconstruct(x, 6).numpy())


def test_artifacts_written_with_the_old_vocabulary_still_load(tmp_path):
    import json

    model = models.OrderedVQVAE(TINY)
    model(tf.zeros((1, 8, 8, 1)))
    path = models.save_autoencoder(model, str(tmp_path / "ae"))
    config_path = tmp_path / "ae" / models.AUTOENCODER_CONFIG
    old = json.load(open(config_path))
    old["num_embeddings"] = old.pop("codebook_size")  # As written before the rename.
    json.dump(old, open(config_path, "w"))
    loaded = models.load_autoencoder(path)
    assert loaded.codebook_size == 16 and loaded.config == model.config
    old["surprise"] = 1
    json.dump(old, open(config_path, "w"))
    with pytest.raises(ValueError, match=r"cannot read .*surprise.*ovqvae train_autoencoder --force"):
        models.load_autoencoder(path)
    # A config that names no fill was trained with zeros (the default before "learned").
    zeros = models.OrderedVQVAE(TINY.replace(fill="zeros"))
    zeros(tf.zeros((1, 8, 8, 1)))
    path = models.save_autoencoder(zeros, str(tmp_path / "zeros"))
    config_path = tmp_path / "zeros" / models.AUTOENCODER_CONFIG
    old = json.load(open(config_path))
    del old["fill"]
    json.dump(old, open(config_path, "w"))
    assert models.load_autoencoder(path).config.fill == "zeros"
    # One that names no length_power drew k untilted.
    del old["length_power"]
    json.dump(old, open(config_path, "w"))
    assert models.load_autoencoder(path).truncation.length_power == 0.0


def test_config_round_trip_and_weights_save_load(tmp_path):
    model = models.OrderedVQVAE(TINY.replace(fill="learned", truncation="geometric",
                                             length_power=1.5))
    assert model.truncation.length_power == 1.5
    x = tf.random.stateless_uniform((2, 8, 8, 1), seed=(3, 4))
    model(x)
    clone = models.OrderedVQVAE.from_config(model.get_config())
    assert clone.config == model.config
    path = models.save_autoencoder(model, str(tmp_path / "ae"))
    loaded = models.load_autoencoder(path)
    assert loaded.config == model.config
    np.testing.assert_array_equal(loaded.encode(x).numpy(), model.encode(x).numpy())
    np.testing.assert_allclose(loaded.decode(model.encode(x), 3).numpy(),
                               model.decode(model.encode(x), 3).numpy(), atol=1e-6)
    (tmp_path / "ae" / models.AUTOENCODER_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="is missing autoencoder.weights.h5"):
        models.load_autoencoder(path)


def test_bad_inputs_name_the_value():
    model = models.OrderedVQVAE(TINY)
    good = np.full((2, 8, 8, 1), 0.5, np.float32)
    with pytest.raises(ValueError, match=r"shape \(2, 8, 8, 3\), expected \[N, 8, 8, 1\]"):
        model.encode(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[0, 1\]"):
        model.encode(good + 1.0)
    bad = good.copy()
    bad[1, 2, 3, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        model.encode(bad)
    codes = model.encode(good)
    for k in (0, 7):
        with pytest.raises(ValueError, match=f"num_codes={k}, expected 1 <= num_codes <= 6"):
            model.decode(codes, k)
    with pytest.raises(ValueError, match=r"codes have shape \(2, 5\), expected \[N, 6\]"):
        model.decode(codes[:, :5])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)codes must be in \[0, codebook_size=16\), got min.*max.*22"):
        model.decode(codes + 16)
    with pytest.raises(ValueError, match="codebook_size=1, expected a codebook of >= 2 codewords"):
        TINY.replace(codebook_size=1)
    with pytest.raises(ValueError, match="not divisible by 4"):
        TINY.replace(hidden=(8, 8), image_shape=(6, 6, 1))
    with pytest.raises(ValueError, match="quantization='pixel'"):
        TINY.replace(quantization="pixel")


@pytest.mark.parametrize("architecture", ["plain", "residual"])
def test_mixed_bfloat16_trains_like_float32(architecture):
    """With compute_dtype="bfloat16" the encoder and decoder compute in bfloat16 and
    everything the quantizer, the losses and the caller see stays float32; training from the
    same seed ends close to float32's. The global policy is left as it was."""
    from pipeline import sources

    images = sources.to_numpy(sources.load("digits", "train")[0])[0][:1024]
    results = {}
    for policy, compute in (("float32", "float32"), ("mixed_bfloat16", "bfloat16")):
        keras.utils.set_random_seed(0)
        model = models.OrderedVQVAE(TINY.replace(compute_dtype=compute,
                                                 architecture=architecture))
        assert keras.mixed_precision.global_policy().name == "float32"
        conv = [layer for layer in model.encoder.layers if "conv" in type(layer).__name__.lower()]
        assert conv and {layer.compute_dtype for layer in conv} == {compute}
        assert model.quantizer.compute_dtype == model.truncation.compute_dtype == "float32"
        assert {w.dtype for w in model.weights} == {"float32"}
        model.compile(keras.optimizers.Adam(3e-3))
        history = model.fit(images, batch_size=64, epochs=4, verbose=0, shuffle=False)
        codes = model.encode(images[:256])
        assert codes.dtype == tf.int32 and model.decode(codes).dtype == tf.float32
        results[policy] = history.history["recon"], model.mse_by_length(images[:256], [2, 6])
    (recon32, mse32), (recon16, mse16) = results["float32"], results["mixed_bfloat16"]
    assert recon32[-1] < 0.8 * recon32[0] and recon16[-1] < 0.8 * recon16[0]  # Both learn.
    np.testing.assert_allclose(recon16, recon32, rtol=0.03)
    for k in (2, 6):
        np.testing.assert_allclose(mse16[k], mse32[k], rtol=0.05)
