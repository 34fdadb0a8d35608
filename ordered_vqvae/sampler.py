"""The anytime sampler: generate the first k of K codes with a cached, XLA-compiled loop.

The whole autoregressive loop is one `tf.function(jit_compile=True)` whose trip count is
the runtime value `num_codes`: one compiled program serves every k for a given batch size,
and its cost grows linearly with k. Codes k+1..K are left at FILL_CODE and the images are
decoded from the first k codes only, with the autoencoder's own truncation fill, exactly
as in training.
"""

from __future__ import annotations

import time
from typing import Dict, Optional, Sequence

import numpy as np
import tensorflow as tf

from ordered_vqvae.truncation import check_num_codes

FILL_CODE = 0  # The code value written beyond k; never read by the decoder.


def filter_logits(logits, temperature, top_k, top_p):
    """Scales by 1/temperature and masks all but the top_k (0: off) logits and the smallest
    set whose probability reaches top_p (1.0: off). logits [B, V]; the rest are scalars.
    The sorts run only when a filter is on."""
    logits = logits / temperature
    active = tf.logical_or(top_k > 0, top_p < 1.0)
    return tf.cond(active, lambda: _top_k_top_p(logits, top_k, top_p), lambda: logits)


def _top_k_top_p(logits, top_k, top_p):
    neg_inf = tf.constant(-1e30, logits.dtype)
    descending = tf.sort(logits, axis=-1, direction="DESCENDING")
    vocab = tf.shape(logits)[-1]
    k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)
    kth = tf.gather(descending, k - 1, axis=-1)[:, None]
    logits = tf.where(logits < kth, neg_inf, logits)
    probs = tf.nn.softmax(tf.sort(logits, axis=-1, direction="DESCENDING"), axis=-1)
    before = tf.cumsum(probs, axis=-1, exclusive=True)
    # The last kept logit in sorted order: everything whose preceding mass is < top_p.
    kept = tf.reduce_sum(tf.cast(before < top_p, tf.int32), axis=-1)
    threshold = tf.gather(descending, tf.maximum(kept, 1) - 1, axis=-1, batch_dims=1)[:, None]
    return tf.where(logits < threshold, neg_inf, logits)


class AnytimeSampler:
    """Samples images from a CodePrior and the OrderedVQVAE whose codes it models.

    Args:
      prior: a `CodePrior` over the autoencoder's codes.
      autoencoder: the `OrderedVQVAE`.
      jit_compile: compile the generation loop with XLA (the fast path).
    """

    def __init__(self, prior, autoencoder, jit_compile: bool = True):
        if prior.code_length != autoencoder.code_length:
            raise ValueError(f"the prior models K={prior.code_length} codes but the autoencoder "
                             f"has K={autoencoder.code_length}")
        if prior.codebook_size != autoencoder.codebook_size:
            raise ValueError(f"the prior's vocabulary is {prior.codebook_size} codes but the "
                             f"autoencoder's codebook has {autoencoder.codebook_size}")
        self.prior, self.autoencoder = prior, autoencoder
        self.code_length = prior.code_length
        self.jit_compile = jit_compile
        self._generate = tf.function(self._generate_loop, jit_compile=jit_compile)
        self._decode = tf.function(self._decode_codes)
        self._calibration: Dict[int, tuple] = {}

    # -- the compiled core

    def _generate_loop(self, prefix, num_fixed, num_codes, seed, temperature, top_k, top_p):
        """prefix int32 [B, K] (codes forced for i < num_fixed) -> (codes [B, K], all finite)."""
        prior, K = self.prior, self.code_length
        batch = tf.shape(prefix)[0]
        prefix_t = tf.transpose(prefix)  # [K, B]: one scatter row per step.

        def body(i, tokens, codes_t, cache, finite):
            logits, cache = prior.step(tokens, cache, i)
            finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(logits)))
            logits = filter_logits(logits, temperature, top_k, top_p)
            step_seed = tf.stack([seed, i])
            drawn = tf.random.stateless_categorical(logits, 1, step_seed, dtype=tf.int32)[:, 0]
            chosen = tf.where(i < num_fixed, prefix_t[i], drawn)
            codes_t = tf.tensor_scatter_nd_update(codes_t, [[i]], chosen[None])
            return i + 1, chosen, codes_t, cache, finite

        start = tf.fill([batch], prior.start_token)
        codes_t = tf.fill([K, batch], FILL_CODE)
        loop_vars = (tf.constant(0), start, codes_t, prior.init_cache(batch), tf.constant(True))
        _, _, codes_t, _, finite = tf.while_loop(lambda i, *_: i < num_codes, body, loop_vars,
                                                 maximum_iterations=K)
        return tf.transpose(codes_t), finite

    def _decode_codes(self, codes, num_codes):
        return self.autoencoder.decode_checked_codes(codes, num_codes)

    # -- validation

    def _check(self, num_samples, num_codes, temperature, top_k, top_p):
        if int(num_samples) < 1:
            raise ValueError(f"num_samples={num_samples}, expected >= 1")
        check_num_codes(int(num_codes), self.code_length)
        if not temperature > 0:
            raise ValueError(f"temperature={temperature}, expected > 0")
        if not 0 <= int(top_k) <= self.prior.codebook_size:
            raise ValueError(f"top_k={top_k}, expected 0 (off) <= top_k <= "
                             f"{self.prior.codebook_size}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p}, expected 0 < top_p <= 1 (1 = off)")

    # -- public API

    def sample_codes(self, num_samples: int, num_codes: int, seed: int = 0,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     prefix: Optional[np.ndarray] = None, num_fixed: int = 0) -> tf.Tensor:
        """Generates codes int32 [num_samples, K]: the first `num_codes` sampled (or, for
        i < num_fixed, copied from `prefix` [num_samples, K]), the rest FILL_CODE."""
        self._check(num_samples, num_codes, temperature, top_k, top_p)
        if prefix is None:
            prefix = tf.zeros([num_samples, self.code_length], tf.int32)
        prefix = tf.convert_to_tensor(prefix, tf.int32)
        if tuple(prefix.shape) != (num_samples, self.code_length):
            raise ValueError(f"prefix has shape {tuple(prefix.shape)}, expected "
                             f"({num_samples}, {self.code_length})")
        if not 0 <= num_fixed <= num_codes:
            raise ValueError(f"num_fixed={num_fixed}, expected 0 <= num_fixed <= num_codes={num_codes}")
        codes, finite = self._generate(
            prefix, tf.constant(num_fixed, tf.int32), tf.constant(num_codes, tf.int32),
            tf.constant(seed, tf.int32), tf.constant(temperature, tf.float32),
            tf.constant(top_k, tf.int32), tf.constant(top_p, tf.float32))
        if not bool(finite):
            raise FloatingPointError("the prior produced NaN or Inf logits while sampling "
                                     f"num_codes={num_codes}; its weights are not finite")
        return codes

    def sample(self, num_samples: int, num_codes: int, seed: int = 0, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0):
        """Returns (images float32 [N,H,W,C] in [0,1], codes int32 [N,K]) from k = num_codes."""
        codes = self.sample_codes(num_samples, num_codes, seed, temperature, top_k, top_p)
        return self._decode(codes, tf.constant(num_codes, tf.int32)), codes

    def sample_progressive(self, num_samples: int, code_lengths: Sequence[int], seed: int = 0,
                           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        """One autoregressive pass to max(code_lengths), decoded at every k in code_lengths.

        Returns ({k: images [N,H,W,C]}, codes [N,K]). The images at a smaller k are exactly
        what `sample` with that k and seed gives: the prefix is shared, not recomputed.
        """
        lengths = sorted(set(int(k) for k in code_lengths))
        if not lengths:
            raise ValueError("code_lengths is empty")
        for k in lengths:
            check_num_codes(k, self.code_length)
        codes = self.sample_codes(num_samples, lengths[-1], seed, temperature, top_k, top_p)
        return {k: self._decode(codes, tf.constant(k, tf.int32)) for k in lengths}, codes

    def complete(self, prefix: np.ndarray, num_fixed: int, num_codes: Optional[int] = None,
                 seed: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        """Keeps the first `num_fixed` codes of each row of `prefix` [N, K] and samples codes
        num_fixed+1..num_codes (K by default). Returns (images, codes)."""
        num_codes = self.code_length if num_codes is None else num_codes
        prefix = np.asarray(prefix)
        codes = self.sample_codes(len(prefix), num_codes, seed, temperature, top_k, top_p,
                                  prefix=prefix, num_fixed=num_fixed)
        return self._decode(codes, tf.constant(num_codes, tf.int32)), codes

    # -- budgeted sampling

    def seconds(self, num_samples: int, num_codes: int, repeats: int = 3) -> float:
        """Best-of-`repeats` wall time of `sample` (codes and decoding) for one k."""
        best = float("inf")
        for r in range(repeats):
            start = time.perf_counter()
            self.sample(num_samples, num_codes, seed=r)[0].numpy()
            best = min(best, time.perf_counter() - start)
        return best

    def calibrate(self, num_samples: int, repeats: int = 3) -> tuple:
        """Measures seconds(k) = a + b*k for this batch size (k = 1 and K, best of
        `repeats`, after compiling) and keeps it. Returns (a, b)."""
        self.seconds(num_samples, 1, repeats=1)  # Compile.
        t1 = self.seconds(num_samples, 1, repeats)
        tk = self.seconds(num_samples, self.code_length, repeats)
        slope = max(tk - t1, 0.0) / max(self.code_length - 1, 1)
        self._calibration[num_samples] = (t1 - slope, slope)
        return self._calibration[num_samples]

    def codes_within(self, seconds: float, num_samples: int) -> int:
        """The largest k whose calibrated cost fits in `seconds` (at least 1)."""
        if seconds <= 0:
            raise ValueError(f"seconds={seconds}, expected a positive time budget")
        if num_samples not in self._calibration:
            self.calibrate(num_samples)
        fixed, per_code = self._calibration[num_samples]
        if per_code <= 0:
            return self.code_length
        fits = np.floor((seconds - fixed) / per_code + 1e-9)  # Tolerate float round-off.
        return int(np.clip(fits, 1, self.code_length))

    def sample_within(self, seconds: float, num_samples: int, seed: int = 0,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        """Samples with the largest k that fits the time budget. Returns (images, codes, k)."""
        k = self.codes_within(seconds, num_samples)
        images, codes = self.sample(num_samples, k, seed, temperature, top_k, top_p)
        return images, codes, k
