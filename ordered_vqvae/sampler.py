"""The anytime sampler: the first k of K tokens from any autoregressive model, in one
XLA-compiled loop.

As in keras-hub's samplers, the loop knows nothing of the model: it drives a
`next(tokens, cache, index) -> (logits, cache)` function (`CodePrior.next`) and passes the
logits through pluggable filters (temperature, top-k, top-p, or your own `LogitFilter`).
It knows nothing of images either: decoding and wall-clock budgets live in
`ordered_vqvae.generator` and `ordered_vqvae.budget`.

Sampling is interruptible: a `SamplingState` (codes so far, the key/value cache, each
row's position) advances by a chunk of codes per compiled call (`extend`) and can stop
between any two chunks, to be decoded at whatever k it reached. Every row keeps its own
position, limit and random stream, so rows of different requests can share one call and
join or leave between chunks (continuous batching), and a row's codes depend only on its
seed, never on which rows it shares a call with. Chunk length, limits and filter settings
are runtime tensors: one compiled program per batch size serves every k and setting, and
its cost grows linearly with the codes generated. Tokens beyond a row's k stay FILL_CODE.
A sampler that runs many passes of one batch size may ask for `cache_segments`: one pass
(`generate`) then runs in that many segments, each on a cache just long enough for the
positions it reaches, which pays at large batches once the extra compile time is spent.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf

from ordered_vqvae.validation import check_num_codes

FILL_CODE = 0  # The code value written beyond k; never read by the decoder.
MASKED = -1e30  # The logit of a token a filter removed.
CACHE_SEGMENTS = 8  # The `cache_segments` that pay for a long-lived sampler at large batches.


def prefix_ends(length: int, parts: int) -> list:
    """The ends of `parts` prefixes of 0..length-1 whose lengths grow in near-equal steps
    (fewer when length < parts): prefix_ends(64, 8) = [8, 16, ..., 64]."""
    return sorted({-(-length * (i + 1) // parts) for i in range(parts)})


def logit_ranks(logits):
    """int32 [B, V]: each logit's rank in its row, 0 for the largest; ties go to the lower
    index, so that "the top k" is always exactly k tokens."""
    order = tf.argsort(logits, axis=-1, direction="DESCENDING", stable=True)
    return tf.argsort(order, axis=-1, stable=True)


def _per_row(value):
    """A setting as a column: a scalar broadcasts to every row, [B] gives one per row."""
    return tf.reshape(value, [-1, 1])


def temperature(logits, value):
    """Scales logits [B, V] by 1 / value (value > 0; a scalar or one per row)."""
    return logits / _per_row(value)


def top_k(logits, value):
    """Keeps exactly the `value` largest logits per row (0: off; a scalar or one per row)."""
    def keep():
        k = _per_row(value)
        kept = tf.logical_or(logit_ranks(logits) < k, k <= 0)
        return tf.where(kept, logits, tf.constant(MASKED, logits.dtype))

    return tf.cond(tf.reduce_any(value > 0), keep, lambda: logits)


def top_p(logits, value):
    """Keeps the smallest set of largest logits whose probability reaches `value` (1: off;
    a scalar or one per row), at least one per row."""
    def keep():
        order = tf.argsort(logits, axis=-1, direction="DESCENDING", stable=True)
        probs = tf.nn.softmax(tf.gather(logits, order, batch_dims=1), axis=-1)
        before = tf.cumsum(probs, axis=-1, exclusive=True)
        kept = tf.maximum(tf.reduce_sum(tf.cast(before < _per_row(value), tf.int32), -1), 1)
        return tf.where(logit_ranks(logits) < kept[:, None], logits,
                        tf.constant(MASKED, logits.dtype))

    return tf.cond(tf.reduce_any(value < 1.0), keep, lambda: logits)


# -- per-row random streams: a counter-based hash of (row seed, position, token)

def _mix(x):
    """A 32-bit integer hash (lowbias32): uint32 -> uint32, well spread."""
    shift = tf.bitwise.right_shift
    x = tf.bitwise.bitwise_xor(x, shift(x, tf.constant(16, tf.uint32)))
    x = x * tf.constant(0x7FEB352D, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, shift(x, tf.constant(15, tf.uint32)))
    x = x * tf.constant(0x846CA68B, tf.uint32)
    return tf.bitwise.bitwise_xor(x, shift(x, tf.constant(16, tf.uint32)))


def row_seeds(seed, num_rows):
    """int32 [num_rows]: the random streams of rows 0..num_rows-1 of a request with `seed`.
    Row i of a request always gets the same stream, wherever it sits in a batch."""
    seed = tf.bitcast(tf.cast(seed, tf.int32), tf.uint32)
    rows = tf.cast(tf.range(num_rows), tf.uint32)
    return tf.bitcast(_mix(_mix(seed) + rows * tf.constant(0x9E3779B9, tf.uint32)), tf.int32)


def numpy_row_seeds(seed: int, num_rows: int) -> np.ndarray:
    """`row_seeds` in NumPy (the same int32 values), for a server that starts rows without a
    graph call."""
    def mix(x):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))

    seed = np.array([seed], np.int32).view(np.uint32)
    rows = np.arange(num_rows, dtype=np.uint32)
    return mix(mix(seed) + rows * np.uint32(0x9E3779B9)).view(np.int32)


def row_uniforms(seeds, positions, vocabulary_size):
    """float32 [B, V] in (0, 1): the uniforms row b uses at `positions[b]`."""
    base = _mix(tf.bitcast(seeds, tf.uint32) + _mix(tf.cast(positions, tf.uint32)))
    tokens = tf.cast(tf.range(vocabulary_size), tf.uint32)
    bits = _mix(base[:, None] ^ (tokens[None, :] * tf.constant(0x85EBCA6B, tf.uint32)))
    top24 = tf.cast(tf.bitwise.right_shift(bits, tf.constant(8, tf.uint32)), tf.float32)
    return (top24 + 0.5) / float(1 << 24)


def draw(logits, seeds, positions):
    """One token per row from logits [B, V] (Gumbel-max on the row's own stream)."""
    gumbel = -tf.math.log(-tf.math.log(row_uniforms(seeds, positions, tf.shape(logits)[1])))
    return tf.argmax(logits + gumbel, axis=-1, output_type=tf.int32)


class SamplingState(NamedTuple):
    """Where an interrupted sampling pass stands.

    codes: int32 [B, K], FILL_CODE beyond each row's position.
    cache: the model's cache (a nest of tensors with batch axis B).
    position: int32 [B], the codes each row has so far (its k).
    finite: bool scalar, whether every logit so far was finite.
    """

    codes: tf.Tensor
    cache: object
    position: tf.Tensor
    finite: tf.Tensor


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
      next_fn: `next(tokens int32 [B], cache, index) -> (logits [B, V], cache)`; index is
        int32 [B], each row's position, or a scalar when every row is at the same one.
      init_cache: `init_cache(batch_size) -> cache`, the nested tensors `next_fn` carries.
      resize_cache: optional `resize_cache(cache, length) -> cache` holding positions
        0..length-1 (a static length), which `cache_segments` > 1 needs.
      cache_segments: one pass (`generate`) grows the cache in this many steps (the ends of
        `prefix_ends(K, cache_segments)`), so that a step's attention reads only the
        positions its segment can reach. Each segment is a loop of its own in the compiled
        program: it saves time per pass at large batches and costs compile time per batch
        size (docs/performance.md). So 1, one loop, by default; ask for more in a sampler
        that runs many passes of one batch size.
      code_length: K, the length of a full sequence.
      start_token: the token fed at position 0.
      vocabulary_size: V, the size of the logits' last axis.
      filters: the LogitFilters applied in order at every step.
      jit_compile: compile the loop with XLA (the fast path).
    """

    def __init__(self, next_fn: Callable, init_cache: Callable, code_length: int,
                 start_token: int, vocabulary_size: int,
                 filters: Sequence[LogitFilter] = DEFAULT_FILTERS, jit_compile: bool = True,
                 resize_cache: Optional[Callable] = None, cache_segments: int = 1):
        if int(cache_segments) != cache_segments or cache_segments < 1:
            raise ValueError(f"cache_segments={cache_segments!r}, expected an integer >= 1")
        if cache_segments > 1 and resize_cache is None:
            raise ValueError(f"cache_segments={cache_segments} needs a resize_cache function "
                             "(the model's; CodePrior.resize_cache)")
        self.next_fn, self.init_cache, self.resize_cache = next_fn, init_cache, resize_cache
        self.cache_segments = int(cache_segments)
        self.code_length, self.start_token = int(code_length), int(start_token)
        self.vocabulary_size = int(vocabulary_size)
        self.filters = tuple(filters)
        # Public and traceable, no argument checks (see their methods' docstrings).
        self.extend = tf.function(self._extend, jit_compile=jit_compile)
        self.generate = tf.function(self._generate, jit_compile=jit_compile)

    @classmethod
    def for_prior(cls, prior, **kwargs) -> "AnytimeSampler":
        """The sampler of a CodePrior: its `next`, its cache, K and codebook."""
        return cls(prior.next, prior.init_cache, prior.code_length, prior.start_token,
                   prior.codebook_size, resize_cache=prior.resize_cache, **kwargs)

    def begin(self, batch_size) -> SamplingState:
        """A fresh state: no codes yet, an empty cache, every row at position 0."""
        return SamplingState(tf.fill([batch_size, self.code_length], FILL_CODE),
                             self.init_cache(batch_size), tf.zeros([batch_size], tf.int32),
                             tf.constant(True))

    def _extend(self, state: SamplingState, steps, seeds, limits, settings,
                prefix=None, num_fixed=0, in_step: bool = False) -> SamplingState:
        """Advances every row with position < its limit by up to `steps` codes.

        Args:
          steps: int32 scalar, the chunk length (at most K).
          seeds: int32 [B], each row's random stream (`row_seeds`).
          limits: int32 [B], the k at which each row stops (rows at their limit stay).
          settings: {filter name: scalar or [B] tensor}.
          prefix, num_fixed: codes [B, K] that rows copy instead of sampling for positions
            < num_fixed (a scalar or [B]); the priority code.
          in_step: every row is at the same position with the same limit (a fresh batch
            sampled in one pass): the model gets one scalar position, and its cache is
            written in place rather than blended row by row (same codes, faster).
        """
        K = self.code_length
        if prefix is None:
            prefix = tf.zeros_like(state.codes)
        num_fixed = tf.broadcast_to(tf.cast(num_fixed, tf.int32), tf.shape(limits))
        slots = tf.range(K)[None, :]

        def body(i, codes, cache, position, finite):
            active = position < limits
            at = tf.minimum(position, K - 1)  # Rows that are done write nowhere they read.
            previous = tf.gather(codes, tf.maximum(at - 1, 0), batch_dims=1)
            tokens = tf.where(at == 0, self.start_token, previous)
            logits, cache = self.next_fn(tokens, cache, at[0] if in_step else at)
            finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(logits)))
            for f in self.filters:
                logits = f.apply(logits, settings[f.name])
            chosen = tf.where(at < num_fixed, tf.gather(prefix, at, batch_dims=1),
                              draw(logits, seeds, at))
            write = tf.logical_and(active[:, None], slots == at[:, None])
            codes = tf.where(write, chosen[:, None], codes)
            return i + 1, codes, cache, position + tf.cast(active, tf.int32), finite

        def more(i, codes, cache, position, finite):
            return tf.logical_and(i < steps, tf.reduce_any(position < limits))

        _, codes, cache, position, finite = tf.while_loop(
            more, body, (tf.constant(0), state.codes, state.cache, state.position, state.finite),
            maximum_iterations=K)
        return SamplingState(codes, cache, position, finite)

    def _generate(self, prefix, num_fixed, num_codes, seed, settings):
        """One pass: prefix int32 [B, K] (copied for positions < num_fixed), k = num_codes,
        row streams from `seed` -> (codes [B, K], all logits finite)."""
        K, batch = self.code_length, tf.shape(prefix)[0]
        seeds, limits = row_seeds(seed, batch), tf.fill([batch], num_codes)
        state = self.begin(batch)
        ends = prefix_ends(K, self.cache_segments)
        start = 0
        for end in ends:  # Segments past k run no step.
            if len(ends) > 1:
                state = state._replace(cache=self.resize_cache(state.cache, end))
            state = self._extend(state, tf.constant(end - start), seeds, limits, settings,
                                 prefix, num_fixed, in_step=True)
            start = end
        return state.codes, state.finite

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
