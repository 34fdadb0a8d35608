"""CodePrior, AnytimeSampler and ImageGenerator: cache equals full pass, fill beyond k,
seeds, filters, budgets, errors."""

import numpy as np
import pytest
import tensorflow as tf

from ordered_vqvae import configs, models, training
from ordered_vqvae import sampler as sampler_module
from ordered_vqvae.configs import PriorConfig, prior_preset
from ordered_vqvae.generator import ImageGenerator
from ordered_vqvae.prior import CodePrior, load_prior, save_prior
from ordered_vqvae.sampler import (
    CACHE_SEGMENTS,
    FILL_CODE,
    AnytimeSampler,
    LogitFilter,
    prefix_ends,
)
from pipeline import sources
from pipeline.config import DataConfig

K, V = 8, 32
AE_CONFIG = configs.preset("digits", hidden=(16,), latent_channels=K, codebook_size=V)


def _prior(seed=0, **kw):
    tf.random.set_seed(seed)
    prior = CodePrior(K, V, num_layers=2, num_heads=4, width=32, ffn_width=64, dropout=0.0, **kw)
    # Larger-than-init weights so that the logits depend clearly on the context.
    for w in prior.trainable_weights:
        w.assign(tf.random.normal(w.shape, stddev=0.3, seed=seed))
    return prior


@pytest.fixture(scope="module")
def sampler():
    ae = models.OrderedVQVAE(AE_CONFIG.replace(fill="learned"))
    ae(tf.zeros((1, 8, 8, 1)))
    ae.truncation.fill_value.assign(tf.random.normal(ae.truncation.fill_value.shape, seed=1))
    return ImageGenerator(_prior(), ae)


def test_cached_steps_equal_the_full_causal_pass():
    prior = _prior()
    codes = tf.random.stateless_uniform((3, K), (1, 2), 0, V, tf.int32)
    tokens, labels = prior.next_code_pairs(codes)
    np.testing.assert_array_equal(labels.numpy(), codes.numpy())
    np.testing.assert_array_equal(tokens.numpy()[:, 0], [V] * 3)  # The start token.
    np.testing.assert_array_equal(tokens.numpy()[:, 1:], codes.numpy()[:, :-1])
    full = prior(tokens).numpy()
    cache = prior.init_cache(3)
    for i in range(K):
        logits, cache = prior.next(tokens[:, i], cache, tf.constant(i))
        np.testing.assert_allclose(logits.numpy(), full[:, i], atol=1e-4)
    # The same cache path also takes several positions per call (a prompt, then steps).
    cache = prior.init_cache(3)
    first, cache = prior.call_with_cache(tokens[:, :5], cache, tf.constant(0))
    rest, cache = prior.call_with_cache(tokens[:, 5:], cache, tf.constant(5))
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), full, atol=1e-4)
    # Causality: changing token j changes no logits before position j.
    changed = tokens.numpy().copy()
    changed[:, 5] = (changed[:, 5] + 1) % V
    other = prior(tf.constant(changed)).numpy()
    np.testing.assert_allclose(other[:, :5], full[:, :5], atol=1e-5)
    assert np.abs(other[:, 5:] - full[:, 5:]).max() > 1e-3


def test_cached_steps_read_only_the_filled_part_of_the_cache():
    prior = _prior()
    codes = tf.random.stateless_uniform((2, K), (5, 6), 0, V, tf.int32)
    tokens = prior.next_code_pairs(codes)[0]
    cache = prior.init_cache(2)
    for i in range(K):
        # NaN in every position not yet written: whole-cache attention would multiply them
        # by zero weights and return NaN; a step with one position per row reads only the
        # first K/8 * j positions that hold position i (K = 8: positions 0..i).
        unwritten = (np.arange(K) > i)[None, None, :, None]
        poisoned = [tuple(tf.where(unwritten, np.nan, t) for t in pair) for pair in cache]
        dirty, _ = prior.next(tokens[:, i], poisoned, tf.fill([2], i))
        logits, cache = prior.next(tokens[:, i], cache, tf.fill([2], i))
        assert np.isfinite(dirty.numpy()).all(), i
        np.testing.assert_allclose(dirty.numpy(), logits.numpy(), rtol=1e-6, atol=1e-6)


def test_prefix_ends_grow_in_near_equal_steps_to_the_length():
    assert prefix_ends(64, 8) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert prefix_ends(10, 4) == [3, 5, 8, 10]
    assert prefix_ends(5, 8) == [1, 2, 3, 4, 5]  # Fewer parts than asked, none empty.
    assert prefix_ends(7, 1) == [7]


def test_one_pass_grows_the_cache_by_segments_and_attends_to_all_of_it(monkeypatch):
    from ordered_vqvae.prior import DecoderBlock

    prior = _prior()
    cache = [tuple(tf.random.normal([2, 4, 3, 8]) for _ in range(2))]
    longer, shorter = (prior.resize_cache(cache, n)[0][0].numpy() for n in (5, 2))
    np.testing.assert_array_equal(longer[:, :, :3], cache[0][0].numpy())
    assert longer.shape[2] == 5 and not longer[:, :, 3:].any()
    np.testing.assert_array_equal(shorter, cache[0][0].numpy()[:, :, :2])
    widths, attend = [], DecoderBlock._attend

    def spy(self, q, keys, *args):
        widths.append(keys.shape[2])
        return attend(self, q, keys, *args)

    monkeypatch.setattr(DecoderBlock, "_attend", spy)
    sampler = AnytimeSampler.for_prior(prior, cache_segments=CACHE_SEGMENTS)
    one_pass = sampler.sample_codes(2, K, seed=3).numpy()
    # K = 8 in CACHE_SEGMENTS = 8 segments, each traced once: each block attends once to a
    # cache of exactly the segment's end.
    assert widths == [w for w in range(1, K + 1) for _ in prior.blocks]
    widths.clear()
    # By default one loop: each block attends once, to the whole cache; the same codes.
    one_loop = AnytimeSampler.for_prior(prior)
    np.testing.assert_array_equal(one_loop.sample_codes(2, K, seed=3).numpy(), one_pass)
    assert widths == [K for _ in prior.blocks]
    widths.clear()
    halves = AnytimeSampler.for_prior(prior, cache_segments=2)
    np.testing.assert_array_equal(halves.sample_codes(2, K, seed=3).numpy(), one_pass)
    assert widths == [w for w in (K // 2, K) for _ in prior.blocks]
    widths.clear()
    state = sampler.extend(sampler.begin(2), tf.constant(K), sampler_module.row_seeds(3, 2),
                           tf.fill([2], K), sampler.settings())
    assert widths == [w for _ in prior.blocks for w in range(1, K + 1)]  # In 8 buckets.
    np.testing.assert_array_equal(state.codes.numpy(), one_pass)


def test_a_bfloat16_prior_stays_close_to_its_float32_reference(sampler, tmp_path):
    sampler.prior(tf.zeros((1, 1), tf.int32))  # Built, as saving needs.
    save_prior(sampler.prior, str(tmp_path))
    reference, half = load_prior(str(tmp_path)), load_prior(str(tmp_path), "bfloat16")
    assert {w.dtype for w in reference.weights} == {"float32"}
    assert {w.dtype for w in half.weights} == {"bfloat16"}
    weights = [(a.numpy(), b.numpy().astype(np.float32))
               for a, b in zip(reference.weights, half.weights)]
    for a, b in weights:  # Rounded to bfloat16's 8-bit mantissa: relative error <= 2^-8.
        np.testing.assert_allclose(b, a, rtol=2.0**-8, atol=1e-30)
    assert {t.dtype for pair in half.init_cache(2) for t in pair} == {tf.bfloat16}
    codes = tf.random.stateless_uniform((16, K), (3, 4), 0, V, tf.int32)
    tokens = reference.next_code_pairs(codes)[0]
    full, low = reference(tokens).numpy(), half(tokens)
    assert low.dtype == tf.float32  # Logits and softmax in float32.
    spread = full.max() - full.min()
    assert 0 < np.abs(low.numpy() - full).max() < 0.02 * spread
    bits = reference.bits_per_code(codes), half.bits_per_code(codes)
    assert abs(bits[1] - bits[0]) < 0.005 * bits[0]
    # Sampling: same seeds, same counter-based streams, so most codes agree; and the
    # bfloat16 cache path matches its own full pass.
    generator = ImageGenerator(half, sampler.autoencoder)
    a = sampler.sample_codes(64, K, seed=5).numpy()
    b = generator.sample_codes(64, K, seed=5).numpy()
    assert b.min() >= 0 and b.max() < V
    assert (a[:, 0] == b[:, 0]).mean() >= 0.9
    cache, steps = half.init_cache(16), []
    for i in range(K):
        logits, cache = half.next(tokens[:, i], cache, tf.constant(i))
        steps.append(logits.numpy())
    np.testing.assert_allclose(np.stack(steps, 1), low.numpy(), atol=0.02 * spread)
    with pytest.raises(ValueError, match="dtype='float16', expected one of"):
        load_prior(str(tmp_path), "float16")


def test_bfloat16_projection_kernels_keep_float32_activations_and_cache(sampler, tmp_path):
    sampler.prior(tf.zeros((1, 1), tf.int32))
    save_prior(sampler.prior, str(tmp_path))
    reference, mixed = load_prior(str(tmp_path)), load_prior(str(tmp_path), "bfloat16_weights")
    halves = [w for w in mixed.weights if w.dtype == "bfloat16"]
    assert len(halves) == 4 * mixed.num_layers  # qkv, proj, ffn_in, ffn_out per block.
    assert all(w.name == "kernel" and len(w.shape) == 2 for w in halves)
    for a, b in zip(reference.weights, mixed.weights):
        exact = 0 if b.dtype == "float32" else 2.0**-8  # Kernels rounded to bfloat16.
        np.testing.assert_allclose(np.asarray(b.numpy(), np.float32), a.numpy(), rtol=exact,
                                   atol=1e-30)
    assert {t.dtype for pair in mixed.init_cache(2) for t in pair} == {tf.float32}
    codes = tf.random.stateless_uniform((16, K), (3, 4), 0, V, tf.int32)
    tokens = reference.next_code_pairs(codes)[0]
    full, low = reference(tokens).numpy(), mixed(tokens)
    assert low.dtype == tf.float32
    spread = full.max() - full.min()
    assert 0 < np.abs(low.numpy() - full).max() < 0.02 * spread
    # The cached steps compute what the full pass does (float32 around the same products).
    cache, steps = mixed.init_cache(16), []
    for i in range(K):
        logits, cache = mixed.next(tokens[:, i], cache, tf.constant(i))
        steps.append(logits.numpy())
    np.testing.assert_allclose(np.stack(steps, 1), low.numpy(), atol=1e-4 * spread)
    a = sampler.sample_codes(64, K, seed=5).numpy()
    for jit in (True, False):  # The mixed product is compiled on its own without XLA.
        b = ImageGenerator(mixed, sampler.autoencoder, jit_compile=jit).sample_codes(
            64, K, seed=5).numpy()
        assert b.min() >= 0 and b.max() < V and (a[:, 0] == b[:, 0]).mean() >= 0.9


def test_row_matmul_equals_the_whole_product():
    from ordered_vqvae.prior import row_matmul

    row_matmul = tf.function(row_matmul, jit_compile=True)  # Where the sampler calls it.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, 64)).astype(np.float32)
    kernel = rng.standard_normal((64, 48)).astype(np.float32)
    for parts in (2, 4, 8):
        y = row_matmul(tf.constant(x), tf.constant(kernel), parts)
        assert y.shape == (1, 1, 48) and y.dtype == tf.float32
        np.testing.assert_allclose(y.numpy(), x @ kernel, rtol=1e-5, atol=1e-5)
    # A bfloat16 kernel: its rounded values, accumulated in float32.
    half = tf.constant(kernel, tf.bfloat16)
    exact = x.astype(tf.bfloat16.as_numpy_dtype).astype(np.float32) @ half.numpy().astype(
        np.float32)
    np.testing.assert_allclose(row_matmul(tf.constant(x), half, 4).numpy(), exact, rtol=1e-5,
                               atol=1e-4)


def test_one_row_sampling_splits_the_products_under_xla_with_the_same_codes(monkeypatch):
    from ordered_vqvae import prior as prior_module

    calls = []
    row_matmul = prior_module.row_matmul

    def counted(x, kernel, parts):
        calls.append((tuple(x.shape), parts))
        return row_matmul(x, kernel, parts)

    monkeypatch.setattr(prior_module, "row_matmul", counted)
    prior = _prior()
    assert prior.row_product_parts == 1  # 33 kB of kernels: split only past 8 MiB.
    codes = {}
    for parts in (1, 4):
        prior.row_product_parts = parts
        for jit in (True, False):
            sampler = AnytimeSampler.for_prior(prior, jit_compile=jit)
            codes[parts, jit] = sampler.sample_codes(1, K, seed=7).numpy()
            split = calls[:]
            calls.clear()
            # Only one row under XLA takes the split: the 4 projections of both blocks.
            assert len(split) == (8 if parts > 1 and jit else 0), (parts, jit)
            assert all(shape == (1, 1, 32) or shape == (1, 1, 64) for shape, _ in split)
            sampler.sample_codes(2, K, seed=7)
            assert not calls
    for key, value in codes.items():
        np.testing.assert_array_equal(value, codes[1, True], err_msg=str(key))
    # Its logits stay within float32 rounding of the whole products'.
    tokens = tf.constant([[V, 3, 5]])

    @tf.function(jit_compile=True)
    def steps(tokens):
        logits, _ = prior.call_with_cache(tokens[:, :1], prior.init_cache(1), tf.constant(0))
        return logits

    split_logits = steps(tokens).numpy()
    prior.row_product_parts = 1
    whole_logits = tf.function(steps.python_function, jit_compile=True)(tokens).numpy()
    np.testing.assert_allclose(split_logits, whole_logits, rtol=1e-5, atol=1e-5)
    # Rows unknown until run time (a SavedModel's signature): split for one row only.
    layer = prior.blocks[0].ffn_in
    layer.row_parts = 4
    project = tf.function(layer, jit_compile=True,
                          input_signature=[tf.TensorSpec([None, 1, 32], tf.float32)])
    calls.clear()
    for rows in (1, 3):
        x = tf.random.normal((rows, 1, 32), seed=rows)
        expected = tf.nn.gelu(x.numpy() @ layer.kernel.numpy() + layer.bias.numpy())
        np.testing.assert_allclose(project(x).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    assert calls == [((None, 1, 32), 4)]  # Traced once, as one branch of a condition.
    big = CodePrior.from_config_for(prior_preset("reference"), 64, 256)
    assert big.row_product_parts == prior_module.ROW_PRODUCT_PARTS


def test_short_samples_carry_the_fill_beyond_k_and_decode_like_the_autoencoder(sampler):
    for k in (1, 3, K):
        images, codes = sampler.sample(5, k, seed=4)
        codes = codes.numpy()
        assert codes.shape == (5, K) and codes.dtype == np.int32
        assert (codes[:, k:] == FILL_CODE).all()
        assert ((codes[:, :k] >= 0) & (codes[:, :k] < V)).all()
        assert images.shape == (5, 8, 8, 1)
        assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0
        np.testing.assert_allclose(images.numpy(), sampler.autoencoder.decode(codes, k).numpy(),
                                   atol=1e-5)
        # Codes beyond k are ignored, whatever they hold (even values outside the codebook).
        padded = codes.copy()
        padded[:, k:] = -1
        np.testing.assert_allclose(sampler.autoencoder.decode(padded, k).numpy(),
                                   images.numpy(), atol=1e-5)


def test_seeds_reproduce_and_one_program_serves_every_k(sampler):
    a = sampler.sample_codes(6, K, seed=11).numpy()
    b = sampler.sample_codes(6, K, seed=11).numpy()
    c = sampler.sample_codes(6, K, seed=12).numpy()
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # A shorter code with the same seed is a prefix of the longer one.
    np.testing.assert_array_equal(sampler.sample_codes(6, 3, seed=11).numpy()[:, :3], a[:, :3])
    generate = sampler.sampler.generate
    traces = generate.experimental_get_tracing_count()
    for k in (1, 2, 5, 7, K):
        sampler.sample_codes(6, k, seed=k, temperature=0.5 + k, top_k=k, top_p=0.9)
    assert generate.experimental_get_tracing_count() == traces


def test_progressive_and_priority_code_completion(sampler):
    images, codes = sampler.sample_progressive(4, [2, 6, K], seed=3)
    assert sorted(images) == [2, 6, K]
    for k in (2, 6):
        single, _ = sampler.sample(4, k, seed=3)
        np.testing.assert_allclose(images[k].numpy(), single.numpy(), atol=1e-6)
    fixed = np.repeat(codes.numpy()[:1], 4, axis=0)
    done_images, done = sampler.complete(fixed, num_fixed=3, seed=9)
    done = done.numpy()
    np.testing.assert_array_equal(done[:, :3], fixed[:, :3])
    assert len({tuple(row) for row in done[:, 3:]}) > 1  # The rest is resampled per row.
    assert done_images.shape == (4, 8, 8, 1)


def test_greedy_top_k_1_matches_a_full_pass_argmax(sampler):
    codes = sampler.sample_codes(2, K, seed=0, top_k=1).numpy()
    prior = sampler.prior
    for i in range(K):
        logits = prior(prior.next_code_pairs(tf.constant(codes))[0])[:, i].numpy()
        np.testing.assert_array_equal(codes[:, i], logits.argmax(-1))


def _kept(logits):
    return (np.asarray(logits) > sampler_module.MASKED / 2).tolist()


def test_filters_match_numpy_and_break_ties_to_exactly_k():
    logits = tf.constant([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    assert _kept(sampler_module.top_k(logits, tf.constant(2))) == [[False, True, True, False],
                                                                  [False, False, True, True]]
    # top_p = 0.7: the first row keeps {3.0} (p=.67) and {2.0}; the second keeps only 5.0.
    assert _kept(sampler_module.top_p(logits, tf.constant(0.7))) == [[False, True, True, False],
                                                                     [False, False, True, False]]
    np.testing.assert_allclose(sampler_module.temperature(logits, tf.constant(2.0)).numpy(),
                               logits.numpy() / 2)
    # Off settings change nothing.
    np.testing.assert_array_equal(sampler_module.top_k(logits, tf.constant(0)), logits)
    np.testing.assert_array_equal(sampler_module.top_p(logits, tf.constant(1.0)), logits)
    # Ties: top_k keeps exactly k logits, the lower indices first.
    tied = tf.constant([[2.0, 2.0, 2.0, 1.0], [0.0, 4.0, 4.0, 4.0]])
    assert _kept(sampler_module.top_k(tied, tf.constant(1))) == [[True, False, False, False],
                                                                [False, True, False, False]]
    assert np.sum(_kept(sampler_module.top_k(tied, tf.constant(2))), axis=1).tolist() == [2, 2]
    # Under XLA too, as the sampler runs them.
    compiled = tf.function(sampler_module.top_k, jit_compile=True)
    assert _kept(compiled(tied, tf.constant(1))) == [[True, False, False, False],
                                                    [False, True, False, False]]


def test_a_custom_filter_plugs_into_the_sampler():
    """The sampler knows nothing of the model: any next() and any filter list."""
    vocab, length = 5, 6

    def next_fn(tokens, cache, index):  # Logits favour (previous token + 1) mod vocab.
        return tf.one_hot((tokens + 1) % vocab, vocab) * 50.0, cache + 1

    only_even = LogitFilter("only_even", lambda logits, on: tf.where(
        tf.logical_and(on, tf.range(vocab) % 2 == 1), sampler_module.MASKED, logits),
        False, tf.bool, lambda value, v: None)
    s = AnytimeSampler(next_fn, lambda b: tf.zeros([b]), length, 0, vocab,
                       filters=(only_even,), jit_compile=True)
    np.testing.assert_array_equal(s.sample_codes(2, length).numpy(), [[1, 2, 3, 4, 0, 1]] * 2)
    assert np.all(s.sample_codes(3, length, only_even=True).numpy() % 2 == 0)
    with pytest.raises(ValueError, match=r"unknown sampling setting\(s\) \['top_k'\]"):
        s.sample_codes(2, 3, top_k=1)


class _ClockedGenerator:
    """Stands in for an ImageGenerator whose sampling takes 20 ms + 5 ms per code."""

    code_length = K

    def sample(self, num_samples, num_codes, seed=0):
        import time

        time.sleep(0.02 + 0.005 * num_codes)
        return tf.zeros([num_samples, 1]), None


def test_timing_recovers_a_known_cost():
    from ordered_vqvae.budget import sampling_seconds

    for k in (1, K):
        seconds = sampling_seconds(_ClockedGenerator(), 2, k, repeats=2)
        assert 0.02 + 0.005 * k <= seconds < 0.02 + 0.005 * k + 0.015


def test_bad_arguments_name_the_value(sampler):
    for k in (0, K + 1):
        with pytest.raises(ValueError, match=f"num_codes={k}, expected 1 <= num_codes <= {K}"):
            sampler.sample(2, k)
    with pytest.raises(ValueError, match="temperature=0"):
        sampler.sample(2, 3, temperature=0.0)
    with pytest.raises(ValueError, match="top_k=33"):
        sampler.sample(2, 3, top_k=33)
    with pytest.raises(ValueError, match="top_p=0"):
        sampler.sample(2, 3, top_p=0.0)
    with pytest.raises(ValueError, match="num_samples=0"):
        sampler.sample(0, 3)
    ae = sampler.autoencoder
    with pytest.raises(ValueError, match="prior models K=6 codes but the autoencoder has K=8"):
        ImageGenerator(CodePrior(6, V, num_layers=1, width=16, num_heads=2, ffn_width=16), ae)
    with pytest.raises(ValueError, match="vocabulary is 64 codes but the autoencoder's codebook has 32"):
        ImageGenerator(CodePrior(K, 64, num_layers=1, width=16, num_heads=2, ffn_width=16), ae)
    broken = _prior()
    broken.head.kernel.assign(tf.fill(broken.head.kernel.shape, np.nan))
    with pytest.raises(FloatingPointError, match="NaN or Inf logits"):
        ImageGenerator(broken, ae).sample(2, 3)
    with pytest.raises(ValueError, match="width=30 is not divisible by num_heads=4"):
        PriorConfig(width=30, num_heads=4)
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match=f"cache_segments={bad}, expected an integer >= 1"):
            ImageGenerator(_prior(), ae, cache_segments=bad)
    with pytest.raises(ValueError, match="cache_segments=8 needs a resize_cache function"):
        AnytimeSampler(broken.next, broken.init_cache, K, V, V, cache_segments=8)


def test_prior_config_round_trip():
    prior = _prior()
    clone = CodePrior.from_config(prior.get_config())
    assert clone.get_config() == prior.get_config()
    assert prior_preset("reference").width == 512


@pytest.mark.slow
def test_prior_learns_real_mnist_codes_below_uniform(tmp_path, mnist_dir):
    train = DataConfig("mnist", path=mnist_dir, max_train=8000).arrays("train")[0]
    test = sources.to_numpy(sources.load("mnist", "test", path=mnist_dir)[0], limit=2000)[0]
    ae = training.train_autoencoder(configs.preset("mnist", epochs=1), train, None,
                                    str(tmp_path / "ae"), verbose=0)

    test_codes = tf.data.Dataset.from_tensor_slices(ae.encode(test).numpy()).batch(128)
    config = prior_preset("mnist", num_layers=2, width=128, ffn_width=256, epochs=2,
                          warmup_steps=50)
    prior = training.train_prior(config, 64, 256, ae.encode(train).numpy(), test_codes,
                                 str(tmp_path / "p"), verbose=0)
    bits = prior.bits_per_code(test_codes)
    print(f"validation bits per code {bits:.3f} vs uniform {np.log2(256):.1f}")
    assert bits < 0.8 * np.log2(256)


def test_cache_write_matches_its_fallback(monkeypatch):
    from ordered_vqvae import prior as prior_module

    cache = tf.random.normal((2, 3, 5, 4), seed=1)
    for steps in (1, 2):
        update = tf.random.normal((2, 3, steps, 4), seed=2)
        expected = cache.numpy().copy()
        expected[:, :, 3:3 + steps] = update.numpy()
        fast = prior_module.write_positions(cache, update, tf.constant(3)).numpy()
        np.testing.assert_array_equal(fast, expected)
        with monkeypatch.context() as m:
            m.setattr(prior_module, "_update_slice", None)
            np.testing.assert_allclose(
                prior_module.write_positions(cache, update, tf.constant(3)).numpy(),
                expected, atol=1e-6)


def test_per_row_positions_match_one_position_at_a_time():
    prior = _prior()
    codes = tf.random.stateless_uniform((3, K), (3, 4), 0, V, tf.int32)
    tokens = prior.next_code_pairs(codes)[0]
    full = prior(tokens).numpy()
    # Row b is fed position order[b][t] at call t: rows at different positions in one call.
    cache = prior.init_cache(3)
    for t in range(K + 2):
        at = tf.constant([min(t, K - 1), min(max(t - 1, 0), K - 1), min(max(t - 2, 0), K - 1)])
        logits, cache = prior.next(tf.gather(tokens, at, batch_dims=1), cache, at)
        for b in range(3):
            np.testing.assert_allclose(logits.numpy()[b], full[b, int(at[b])], atol=1e-4)


def test_chunked_sampling_equals_one_pass_and_ignores_batch_mates(sampler):
    s = sampler.sampler
    settings = s.settings(temperature=0.8)
    one_pass = s.sample_codes(3, K, seed=5, temperature=0.8).numpy()
    state = s.begin(3)
    seeds = sampler_module.row_seeds(5, 3)
    for _ in range(4):  # Chunks of 3: 3, 6, 8 (capped by the limit), then nothing to do.
        state = s.extend(state, tf.constant(3), seeds, tf.fill([3], K), settings)
    np.testing.assert_array_equal(state.codes.numpy(), one_pass)
    np.testing.assert_array_equal(state.position.numpy(), [K] * 3)
    # The same request joins a batch mid-way, beside rows of another request with other
    # seeds, limits and positions: its codes do not change.
    other = s.begin(2)
    other_seeds = sampler_module.row_seeds(99, 2)
    other = s.extend(other, tf.constant(4), other_seeds, tf.constant([6, 3]), settings)
    fresh = s.begin(3)
    mixed = sampler_module.SamplingState(
        tf.concat([other.codes, fresh.codes], 0),
        [tuple(tf.concat([a, b], 0) for a, b in zip(x, y)) for x, y in zip(other.cache, fresh.cache)],
        tf.concat([other.position, fresh.position], 0), tf.constant(True))
    mixed_seeds = tf.concat([other_seeds, seeds], 0)
    limits = tf.constant([6, 3, K, K, K])
    while bool(tf.reduce_any(mixed.position < limits)):
        mixed = s.extend(mixed, tf.constant(2), mixed_seeds, limits, settings)
    np.testing.assert_array_equal(mixed.codes.numpy()[2:], one_pass)
    np.testing.assert_array_equal(mixed.position.numpy(), [6, 3, K, K, K])
    assert (mixed.codes.numpy()[1, 3:] == FILL_CODE).all()


def test_refine_yields_growing_k_with_the_one_pass_codes(sampler):
    steps = list(sampler.refine(2, seed=7, chunk=3, max_codes=7))
    assert [k for k, _, _ in steps] == [3, 6, 7]
    full = sampler.sample_codes(2, 7, seed=7).numpy()
    for k, images, codes in steps:
        np.testing.assert_array_equal(codes.numpy()[:, :k], full[:, :k])
        np.testing.assert_allclose(images.numpy(), sampler.decode(full, k).numpy(), atol=1e-6)
    # Per-row k: each row decodes at its own k.
    rows = sampler.autoencoder.decode(full, tf.constant([2, 7]))
    np.testing.assert_allclose(rows.numpy()[0], sampler.decode(full, 2).numpy()[0], atol=1e-6)
    np.testing.assert_allclose(rows.numpy()[1], sampler.decode(full, 7).numpy()[1], atol=1e-6)


def test_cost_model_learns_an_upper_bound_with_a_positive_slope():
    from ordered_vqvae.budget import CostModel

    costs = CostModel(quantile=0.9, min_slope=1e-4)
    assert costs.extend_seconds("b", 4) is None and costs.affordable_codes("b", 1.0, 8) is None
    costs.observe_extend("b", 4, 99.0)  # The first call compiles: not kept.
    costs.observe_decode("b", 99.0)
    rng = np.random.default_rng(0)
    for _ in range(40):
        c = int(rng.integers(1, 9))
        costs.observe_extend("b", c, 0.010 + 0.002 * c + rng.uniform(0, 0.001))
        costs.observe_decode("b", 0.005 + rng.uniform(0, 0.001))
    for c in (1, 4, 8):  # Above the mean cost, below the worst case plus a little.
        assert 0.010 + 0.002 * c + 0.0005 < costs.extend_seconds("b", c) < 0.010 + 0.002 * c + 0.0015
    assert 0.0055 < costs.decode_seconds("b") <= 0.006
    # 0.0300 s: 8 codes need ~0.0266 + decode ~0.0059 -> too much; 7 codes ~0.0246 fit.
    assert costs.affordable_codes("b", 0.0310, 8) == 7
    assert costs.affordable_codes("b", 0.001, 8) == 0
    flat = CostModel(min_slope=1e-3)  # Noise that makes longer chunks look free.
    flat.observe_extend("f", 1, 0.0)
    for c, t in ((1, 0.02), (8, 0.019), (1, 0.021), (8, 0.018)):
        flat.observe_extend("f", c, t)
    assert flat.extend_seconds("f", 64) >= flat.extend_seconds("f", 1) + 63 * 1e-3
    # A stall (a call 100x slower than usual) stays out of the fit: with it in, the upper
    # quantile of a few observations would predict ~0.2 s for every call.
    stalled = CostModel(quantile=0.98)
    for c, t in ((1, 9.0), (1, 0.002), (8, 0.004), (1, 0.2), (8, 0.004), (1, 0.002)):
        stalled.observe_extend("s", c, t)
        stalled.observe_decode("s", t)
    assert 0.0019 < stalled.extend_seconds("s", 1) < 0.0025
    assert 0.0039 < stalled.decode_seconds("s") < 0.0041


def test_sample_until_spends_the_budget_and_learns(sampler):
    from ordered_vqvae.budget import CostModel

    costs = CostModel()
    for _ in range(3):  # Learn the costs of this batch size.
        sampler.sample_until(5.0, 2, seed=1, chunk=2, costs=costs)
    images, codes, k = sampler.sample_until(5.0, 2, seed=1, chunk=2, costs=costs)
    assert k == K and images.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(codes.numpy(), sampler.sample_codes(2, K, seed=1).numpy())
    _, codes, k = sampler.sample_until(1e-6, 2, seed=1, chunk=2, min_codes=3, costs=costs)
    assert k == 3 and (codes.numpy()[:, 3:] == FILL_CODE).all()
    with pytest.raises(ValueError, match="min_codes=9"):
        sampler.sample_until(1.0, 2, min_codes=9, max_codes=K)


def test_numpy_row_seeds_are_the_graphs():
    for seed in (0, 1, 7, 2**31 - 1, 123456789):
        np.testing.assert_array_equal(sampler_module.numpy_row_seeds(seed, 5),
                                      sampler_module.row_seeds(seed, 5).numpy())
