"""The anytime sampler: the first k of K tokens from any autoregressive model, in one
XLA-compiled loop.

As in keras-hub's samplers, the loop knows nothing of the model: it drives a
`next(tokens, cache, index) -> (logits, cache)` function (`CodePrior.next`) and passes the
logits through pluggable filters (temperature, top-k, top-p, or your own `LogitFilter`).
It knows nothing of images either: decoding and wall-clock budgets live in
`ordered_vqvae.generator` and `ordered_vqvae.budget`.

The loop's trip count is the runtime value `num_codes`, and filter settings are runtime
tensors: one compiled program per batch size serves every k and every setting, and its
cost grows linearly with k. Tokens k+1..K are left at FILL_CODE.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import tensorflow as tf

from ordered_vqvae.validation import check_num_codes

FILL_CODE = 0  # The code value written beyond k; never read by the decoder.
MASKED = -1e30  # The logit of a token a filter removed.


def logit_ranks(logits):
    """int32 [B, V]: each logit's rank in its row, 0 for the largest; ties go to the lower
    index, so that "the top k" is always exactly k tokens."""
    order = tf.argsort(logits, axis=-1, direction="DESCENDING", stable=True)
    return tf.argsort(order, axis=-1, stable=True)


def temperature(logits, value):
    """Scales logits [B, V] by 1 / value (value > 0)."""
    return logits / value


def top_k(logits, value):
    """Keeps exactly the `value` largest logits per row (0: off)."""
    def keep():
        return tf.where(logit_ranks(logits) < value, logits, tf.constant(MASKED, logits.dtype))

    return tf.cond(value > 0, keep, lambda: logits)


def top_p(logits, value):
    """Keeps the smallest set of largest logits whose probability reaches `value` (1: off),
    at least one per row."""
    def keep():
        order = tf.argsort(logits, axis=-1, direction="DESCENDING", stable=True)
        probs = tf.nn.softmax(tf.gather(logits, order, batch_dims=1), axis=-1)
        before = tf.cumsum(probs, axis=-1, exclusive=True)
        kept = tf.maximum(tf.reduce_sum(tf.cast(before < value, tf.int32), axis=-1), 1)
        return tf.where(logit_ranks(logits) < kept[:, None], logits,
                        tf.constant(MASKED, logits.dtype))

    return tf.cond(value < 1.0, keep, lambda: logits)


@dataclasses.dataclass(frozen=True)
class LogitFilter:
    """One step of logit processing with a runtime setting.

    apply: (logits float32 [B, V], value scalar tensor) -> logits [B, V].
    default: the setting that leaves logits unchanged (or the usual one).
    check: (value, vocabulary_size) -> None, raising ValueError naming a bad value.
    """

    name: str
    apply: Callable
    default: float
    dtype: tf.DType
    check: Callable


def _check_temperature(value, vocabulary_size):
    if not value > 0:
        raise ValueError(f"temperature={value}, expected > 0")


def _check_top_k(value, vocabulary_size):
    if int(value) != value or not 0 <= value <= vocabulary_size:
        raise ValueError(f"top_k={value}, expected an integer 0 (off) <= top_k <= "
                         f"{vocabulary_size}")


def _check_top_p(value, vocabulary_size):
    if not 0.0 < value <= 1.0:
        raise ValueError(f"top_p={value}, expected 0 < top_p <= 1 (1 = off)")


DEFAULT_FILTERS = (
    LogitFilter("temperature", temperature, 1.0, tf.float32, _check_temperature),
    LogitFilter("top_k", top_k, 0, tf.int32, _check_top_k),
    LogitFilter("top_p", top_p, 1.0, tf.float32, _check_top_p),
)


class AnytimeSampler:
    """Generates token sequences [B, K] of which the first k are sampled.

    Args:
      next_fn: `next(tokens int32 [B], cache, index int32 scalar) -> (logits [B, V], cache)`.
      init_cache: `init_cache(batch_size) -> cache`, the nested tensors `next_fn` carries.
      code_length: K, the length of a full sequence.
      start_token: the token fed at position 0.
      vocabulary_size: V, the size of the logits' last axis.
      filters: the LogitFilters applied in order at every step.
      jit_compile: compile the loop with XLA (the fast path).
    """

    def __init__(self, next_fn: Callable, init_cache: Callable, code_length: int,
                 start_token: int, vocabulary_size: int,
                 filters: Sequence[LogitFilter] = DEFAULT_FILTERS, jit_compile: bool = True):
        self.next_fn, self.init_cache = next_fn, init_cache
        self.code_length, self.start_token = int(code_length), int(start_token)
        self.vocabulary_size = int(vocabulary_size)
        self.filters = tuple(filters)
        # Public and traceable: (prefix, num_fixed, num_codes, seed, filter settings) ->
        # (codes int32 [B, K], whether every logit was finite). No argument checks.
        self.generate = tf.function(self._loop, jit_compile=jit_compile)

    @classmethod
    def for_prior(cls, prior, **kwargs) -> "AnytimeSampler":
        """The sampler of a CodePrior: its `next`, its cache, K and codebook."""
        return cls(prior.next, prior.init_cache, prior.code_length, prior.start_token,
                   prior.codebook_size, **kwargs)

    def _loop(self, prefix, num_fixed, num_codes, seed, settings):
        """prefix int32 [B, K] (tokens forced for i < num_fixed) -> (codes [B, K], finite)."""
        batch = tf.shape(prefix)[0]
        prefix_t = tf.transpose(prefix)  # [K, B]: one scatter row per step.

        def body(i, tokens, codes_t, cache, finite):
            logits, cache = self.next_fn(tokens, cache, i)
            finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(logits)))
            for f in self.filters:
                logits = f.apply(logits, settings[f.name])
            drawn = tf.random.stateless_categorical(logits, 1, tf.stack([seed, i]),
                                                    dtype=tf.int32)[:, 0]
            chosen = tf.where(i < num_fixed, prefix_t[i], drawn)
            codes_t = tf.tensor_scatter_nd_update(codes_t, [[i]], chosen[None])
            return i + 1, chosen, codes_t, cache, finite

        loop_vars = (tf.constant(0), tf.fill([batch], self.start_token),
                     tf.fill([self.code_length, batch], FILL_CODE), self.init_cache(batch),
                     tf.constant(True))
        _, _, codes_t, _, finite = tf.while_loop(lambda i, *_: i < num_codes, body, loop_vars,
                                                 maximum_iterations=self.code_length)
        return tf.transpose(codes_t), finite

    def settings(self, **values) -> Dict[str, tf.Tensor]:
        """The filter settings as tensors: the given values (checked), defaults for the rest."""
        unknown = sorted(set(values) - {f.name for f in self.filters})
        if unknown:
            raise ValueError(f"unknown sampling setting(s) {unknown}, expected some of "
                             f"{[f.name for f in self.filters]}")
        out = {}
        for f in self.filters:
            value = values.get(f.name, f.default)
            f.check(value, self.vocabulary_size)
            out[f.name] = tf.constant(value, f.dtype)
        return out

    def sample_codes(self, num_samples: int, num_codes: int, seed: int = 0,
                     prefix: Optional[np.ndarray] = None, num_fixed: int = 0,
                     **settings) -> tf.Tensor:
        """Codes int32 [num_samples, K]: the first `num_codes` sampled (or, for
        i < num_fixed, copied from `prefix` [num_samples, K]), the rest FILL_CODE.
        `settings`: filter values by name (temperature=, top_k=, top_p=)."""
        if int(num_samples) < 1:
            raise ValueError(f"num_samples={num_samples}, expected >= 1")
        check_num_codes(int(num_codes), self.code_length)
        values = self.settings(**settings)
        if prefix is None:
            prefix = tf.zeros([num_samples, self.code_length], tf.int32)
        prefix = tf.convert_to_tensor(prefix, tf.int32)
        if tuple(prefix.shape) != (num_samples, self.code_length):
            raise ValueError(f"prefix has shape {tuple(prefix.shape)}, expected "
                             f"({num_samples}, {self.code_length})")
        if not 0 <= num_fixed <= num_codes:
            raise ValueError(f"num_fixed={num_fixed}, expected 0 <= num_fixed <= "
                             f"num_codes={num_codes}")
        codes, finite = self.generate(prefix, tf.constant(num_fixed, tf.int32),
                                      tf.constant(num_codes, tf.int32),
                                      tf.constant(seed, tf.int32), values)
        if not bool(finite):
            raise FloatingPointError("the model produced NaN or Inf logits while sampling "
                                     f"num_codes={num_codes}; its weights are not finite")
        return codes
