"""Nested truncation: keep the first k of K codes and fill the rest (Rippel et al., 2014)."""

from __future__ import annotations

from typing import Optional

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from ordered_vqvae.configs import DISTRIBUTIONS, FILLS
from ordered_vqvae.validation import check_between, check_choice, check_num_codes


@keras.saving.register_keras_serializable(package="ordered_vqvae")
class NestedTruncation(keras.layers.Layer):
    """Keeps the first k tokens of [N, K, D] and replaces the rest with a fill value.

    In training k is drawn from `distribution` over {min_codes, ..., K}:
      none: always K (an unordered model).
      uniform: one k per batch, uniform (the reference implementation).
      uniform_per_example: one uniform k per example.
      geometric: one k per example, P(k) proportional to (1 - p)^(k - min_codes).
      all: every k (the paper's exact objective); the model evaluates all prefixes and
        this layer supplies them (`prefix_lengths`); `call` alone then keeps all K.
    `length_power` a tilts any of them toward long prefixes: P(k) is multiplied by k^a (a = 0
    leaves it as it is), so that later positions train more often (keep probability about
    1 - (j/K)^(a+1) for uniform k instead of 1 - j/K).
    `full_code_share` s mixes k = K into the distribution: P(k) = (1 - s) P(k) + s [k = K], so
    that a fixed share of examples trains the whole code (with `all`, P(k) weighs the loss
    of each prefix).
    At inference k is `num_codes` (K when not given). `fill` is "zeros" (reference) or
    "learned", one trainable vector per position.
    """

    def __init__(self, code_length: int, distribution: str = "uniform", min_codes: int = 1,
                 geometric_p: float = 0.1, fill: str = "zeros", seed: int = 0,
                 full_code_share: float = 0.0, length_power: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        check_choice("distribution", distribution, DISTRIBUTIONS)
        check_choice("fill", fill, FILLS)
        check_between("min_codes", min_codes, 1, code_length)
        check_between("geometric_p", geometric_p, 0.0, 1.0, low_open=True, high_open=True)
        check_between("full_code_share", full_code_share, 0.0, 1.0, high_open=True)
        check_between("length_power", length_power, 0.0, 16.0)
        self.full_code_share = float(full_code_share)
        self.length_power = float(length_power)
        self.code_length = int(code_length)
        self.distribution = distribution
        self.min_codes = int(min_codes)
        self.geometric_p = float(geometric_p)
        self.fill = fill
        self.seed = int(seed)
        self._seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        if input_shape[1] is not None and input_shape[1] != self.code_length:
            raise ValueError(f"NestedTruncation expects {self.code_length} tokens on axis 1, "
                             f"got shape {input_shape}")
        self.fill_value = None
        if self.fill == "learned":
            self.fill_value = self.add_weight(name="fill_value",
                                              shape=(self.code_length, input_shape[-1]),
                                              initializer="zeros")

    # -- the distribution of k

    def length_probabilities(self, distribution: Optional[str] = None) -> np.ndarray:
        """P(k) for k = 1..K as a NumPy array [K] (zero below min_codes), under
        `distribution` (default: the layer's own)."""
        distribution = distribution or self.distribution
        k = np.arange(1, self.code_length + 1)
        if distribution == "none":
            p = (k == self.code_length).astype(np.float64)
        elif distribution == "geometric":
            p = np.where(k >= self.min_codes, (1 - self.geometric_p) ** (k - self.min_codes), 0.0)
        else:
            p = (k >= self.min_codes).astype(np.float64)
        p = p * k.astype(np.float64) ** self.length_power
        p = p / p.sum()
        return (1 - self.full_code_share) * p + self.full_code_share * (k == self.code_length)

    def keep_probabilities(self, distribution: Optional[str] = None) -> np.ndarray:
        """P(token j is kept) for j = 0..K-1: the expected keep mask."""
        return np.cumsum(self.length_probabilities(distribution)[::-1])[::-1]

    def prefix_lengths(self):
        """The k's averaged over by the `all` objective."""
        return list(range(self.min_codes, self.code_length + 1))

    def sample_lengths(self, batch_size, seed=None, distribution: Optional[str] = None):
        """Draws int32 [batch_size] code lengths for one training batch, from
        `distribution` (default: the layer's own; a training stage passes its own).

        `seed`: an int32 [2] stateless seed; without it the layer's own generator advances.
        The training stream passes one derived from the global step, so that a resumed or
        distributed run draws the same lengths as an uninterrupted single-device one.
        """
        distribution = distribution or self.distribution
        if distribution in ("none", "all"):
            return tf.fill([batch_size], self.code_length)
        dist = tfp.distributions.Categorical(
            logits=tf.math.log(tf.constant(self.length_probabilities(distribution), tf.float32)))
        if seed is None:
            seed = keras.random.randint((2,), 0, 2**30, seed=self._seed_generator, dtype="int32")
        if distribution == "uniform":
            one = dist.sample(seed=seed)
            lengths = tf.fill([batch_size], one)
        else:
            lengths = dist.sample(batch_size, seed=seed)
        return tf.cast(lengths, tf.int32) + 1

    # -- applying it

    def keep_mask(self, lengths):
        """float32 [N, K]: 1 for positions < k_n, else 0."""
        return tf.sequence_mask(lengths, self.code_length, dtype=tf.float32)

    def apply(self, tokens, lengths):
        """tokens [N, K, D], lengths int32 [N] -> (truncated tokens, keep mask [N, K])."""
        mask = self.keep_mask(lengths)
        out = tokens * mask[:, :, None]
        if self.fill_value is not None:
            out = out + (1.0 - mask[:, :, None]) * self.fill_value[None]
        return out, mask

    def call(self, tokens, num_codes=None, training=False):
        """Returns (truncated tokens [N, K, D], keep mask [N, K])."""
        batch = tf.shape(tokens)[0]
        if num_codes is not None:
            lengths = tf.fill([batch], check_num_codes(num_codes, self.code_length))
        elif training:
            lengths = self.sample_lengths(batch)
        else:
            lengths = tf.fill([batch], self.code_length)
        return self.apply(tokens, lengths)

    def get_config(self):
        config = super().get_config()
        config.update(code_length=self.code_length, distribution=self.distribution,
                      min_codes=self.min_codes, geometric_p=self.geometric_p, fill=self.fill,
                      seed=self.seed, full_code_share=self.full_code_share,
                      length_power=self.length_power)
        return config
