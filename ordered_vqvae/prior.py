"""CodePrior: a decoder-only causal Transformer over code sequences.

Written in the keras-hub style (pre-norm decoder blocks with learned position embeddings,
sublayers built in `build`, `get_config` round trips). Each `DecoderBlock` has one `call`
with an optional key/value cache, as keras-hub's `TransformerDecoder` does:

- without a cache: a full causal pass over [B, T] positions (training, scoring);
- with `cache` and `cache_index`: the positions starting at `cache_index`, attending to the
  cache, which they update. The cache is one (keys, values) pair of [B, heads, L, head_dim]
  tensors per layer, written with a dynamic-update-slice (in place under XLA) and read by
  masked attention: with one position for all rows, over all L (a sampler's one pass may
  grow L segment by segment, `resize_cache`); with one position per row, over the first
  of 8 widths of the cache that holds every written position. So a compiled sampling loop
  costs O(k) in the codes it generates (docs/performance.md compares it with keras-hub's
  cache).
  At batch 1 under XLA, a large prior's projections run as batched products over
  quarters of their inputs (`row_matmul`), which XLA spreads over every core.

`CodePrior.call_with_cache` is the `next(tokens, cache, index)` function the sampler
(`ordered_vqvae.sampler`) drives. Training is a plain `compile`/`fit` with a stock sparse
cross-entropy from logits on (inputs, labels) = `next_code_pairs(codes)`.

The vocabulary is the codebook plus one start token (id = codebook_size).
"""

from __future__ import annotations

import math
from typing import List, Tuple

import keras
import numpy as np
import tensorflow as tf

from ordered_vqvae import artifacts
from ordered_vqvae.configs import PriorConfig
from ordered_vqvae.replicas import loggable
from ordered_vqvae.sampler import prefix_ends
from ordered_vqvae.validation import check_choice, finite_loss

try:  # TensorFlow's XLA op wrapper: in place under XLA, and it has a plain TF kernel too.
    from tensorflow.compiler.tf2xla.python.xla import dynamic_update_slice as _update_slice
except ImportError:  # pragma: no cover - other TF builds: a padded blend, same result.
    _update_slice = None
try:  # Whether the op being built will be compiled by XLA.
    from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext
except ImportError:  # pragma: no cover - other TF builds: one-row products stay whole.
    GraphOrParentsInXlaContext = None

# One-row products under XLA (see `row_matmul`): split in this many parts when a prior's
# projection kernels total at least this many bytes. Smaller priors stay in the caches,
# where the split only adds work (sampling at batch 1 on a 2-core EPYC, split against
# whole: priors of 7 MB 1.38x the time, 10 MB 0.87x, 20 MB 0.64x, 77 MB 0.62x).
ROW_PRODUCT_PARTS = 4
ROW_PRODUCT_MIN_BYTES = 8 * 2**20
# A cached step with one position per row (interruptible sampling, continuous batching)
# attends to the first of this many widths of the cache (L/8, 2L/8, ..., L) that holds
# every position written so far, not to all L: the cache is read in full only in the last
# eighth of a pass. (Each narrower width is a copy. A step with one position for all rows,
# the sampler's one pass, attends to all of its cache instead, which the pass may grow as
# it goes, see `CodePrior.resize_cache`.)
ATTENTION_BUCKETS = 8

NEG_INF = -1e9


def write_positions(cache, update, index):
    """cache [B, h, K, d] with update [B, h, T, d] written at positions index..index+T-1."""
    if _update_slice is not None:
        return _update_slice(cache, update, tf.stack([0, 0, index, 0]))
    length, steps = tf.shape(cache)[2], tf.shape(update)[2]
    pad = [[0, 0], [0, 0], [index, length - index - steps], [0, 0]]
    inside = tf.pad(tf.ones_like(update), pad)
    return cache * (1 - inside) + tf.pad(update, pad)


def _mixed_product(x, kernel):
    """x [..., n] times kernel [..., n, m] with operands in the kernel's dtype, float32
    accumulation and result: for a bfloat16 kernel, one dot that reads its 2 bytes per
    weight. XLA has that dot and TensorFlow's CPU kernels do not: outside XLA, call
    `_mixed_matmul`."""
    return tf.raw_ops.BatchMatMulV3(x=tf.cast(x, kernel.dtype), y=kernel, Tout=tf.float32)


_mixed_matmul = tf.function(_mixed_product, jit_compile=True)


def _compiled_by_xla() -> bool:
    return GraphOrParentsInXlaContext is not None and GraphOrParentsInXlaContext(
        tf.compat.v1.get_default_graph())


def row_matmul(x, kernel, parts: int):
    """x [..., n] times kernel [n, m] as `parts` products of n / parts inputs each (one
    batched product), accumulated in float32 and summed, in x's dtype. XLA computes a
    matrix-vector product on one thread and the batched one on every core, so this is for
    one row (where the reshapes are free). The sum runs in another order than the whole
    product's, so results differ from it in the last bits."""
    n, m = kernel.shape
    pieces = tf.transpose(tf.reshape(x, [-1, parts, n // parts]), [1, 0, 2])
    y = _mixed_product(pieces, tf.reshape(kernel, [parts, n // parts, m]))
    shape = tf.concat([tf.shape(x)[:-1], [m]], 0)
    return tf.cast(tf.reshape(tf.reduce_sum(y, axis=0), shape), x.dtype)


@keras.saving.register_keras_serializable(package="ordered_vqvae")
class Projection(keras.layers.Dense):
    """Keras's Dense, whose kernel may be kept in bfloat16 (`kernel_dtype="bfloat16"`) while
    the layer computes in float32: half the weight traffic of a sampling step, with float32
    activations, accumulation and key/value cache. The default (None) is Dense itself.

    `row_parts` > 1 (a runtime setting, not saved): a product of one row under XLA is
    computed by `row_matmul` in that many parts (`CodePrior` sets it by its size)."""

    row_parts = 1

    def __init__(self, units: int, kernel_dtype=None, **kwargs):
        super().__init__(units, **kwargs)
        self.kernel_dtype = kernel_dtype

    def build(self, input_shape):
        if self.kernel_dtype is None:
            return super().build(input_shape)
        # Not autocast: the product reads the bfloat16 kernel as it is.
        self._kernel = self.add_weight(name="kernel", shape=(input_shape[-1], self.units),
                                       initializer=self.kernel_initializer,
                                       dtype=self.kernel_dtype, autocast=False)
        self.bias = self.add_weight(name="bias", shape=(self.units,),
                                    initializer=self.bias_initializer)
        self.built = True

    def call(self, inputs, training=None):
        kernel = self.kernel if self.kernel_dtype is None else self._kernel.value
        return self.activation(self._matmul(inputs, kernel, training) + self.bias)

    def _matmul(self, x, kernel, training):
        xla = _compiled_by_xla()

        def whole():
            if self.kernel_dtype is None:
                return tf.matmul(x, kernel)
            # Under XLA the op itself (a nested compiled function beside the attention's
            # switch_case crashed TF 2.21's XLA compiler); without, its compiled call.
            return _mixed_product(x, kernel) if xla else _mixed_matmul(x, kernel)

        parts, rows = self.row_parts, x.shape[:-1].num_elements()
        if parts < 2 or training or rows not in (1, None) or x.shape[-1] % parts or not xla:
            return whole()
        if rows == 1:
            return row_matmul(x, kernel, parts)
        # Rows known only at run time (a SavedModel's signature): the choice is made there.
        return tf.cond(tf.size(x) == x.shape[-1], lambda: row_matmul(x, kernel, parts), whole)

    def get_config(self):
        return {**super().get_config(), "kernel_dtype": self.kernel_dtype}


@keras.saving.register_keras_serializable(package="ordered_vqvae")
class DecoderBlock(keras.layers.Layer):
    """Pre-norm causal self-attention + feed-forward block. `kernel_dtype`: the dtype its
    four projections keep their kernels in (None: the block's dtype; see `Projection`)."""

    def __init__(self, num_heads: int, ffn_width: int, dropout: float = 0.0,
                 kernel_dtype=None, **kwargs):
        super().__init__(**kwargs)
        self.num_heads, self.ffn_width, self.dropout = num_heads, ffn_width, dropout
        self.kernel_dtype = kernel_dtype

    def build(self, input_shape):
        width = input_shape[-1]
        self.head_dim = width // self.num_heads
        dtype = self.dtype_policy  # Sublayers compute in the block's dtype.
        kernels = dict(dtype=dtype, kernel_dtype=self.kernel_dtype)
        self.norm1 = keras.layers.LayerNormalization(epsilon=1e-5, dtype=dtype, name="norm1")
        self.qkv = Projection(3 * width, name="qkv", **kernels)
        self.proj = Projection(width, name="proj", **kernels)
        self.norm2 = keras.layers.LayerNormalization(epsilon=1e-5, dtype=dtype, name="norm2")
        self.ffn_in = Projection(self.ffn_width, activation="gelu", name="ffn_in", **kernels)
        self.ffn_out = Projection(width, name="ffn_out", **kernels)
        self.drop = keras.layers.Dropout(self.dropout, dtype=dtype)
        for layer, shape in ((self.norm1, input_shape), (self.qkv, input_shape),
                             (self.proj, input_shape), (self.norm2, input_shape),
                             (self.ffn_in, input_shape),
                             (self.ffn_out, tuple(input_shape[:-1]) + (self.ffn_width,))):
            layer.build(shape)

    def _heads(self, x):
        """[B, T, width] -> [B, heads, T, head_dim]."""
        shape = tf.concat([tf.shape(x)[:2], [self.num_heads, self.head_dim]], 0)
        return tf.transpose(tf.reshape(x, shape), [0, 2, 1, 3])

    def call(self, x, cache=None, cache_index=None, training=False, buckets=1):
        """x [B, T, width] -> [B, T, width].

        Without `cache`, position t attends to 0..t. With `cache` = (keys, values), each
        [B, heads, L, head_dim], and `cache_index` (int32 scalar), x holds positions
        cache_index..cache_index+T-1: they are written into the cache and attend to every
        cached position up to their own. Returns (y, updated cache) then. `cache_index` may
        also be int32 [B], one position per row (T = 1): rows at different positions share
        one call, as continuous batching needs. `buckets` > 1: attend only to the first of
        that many widths of the cache (L/buckets, ..., L) that holds every written position.
        """
        q, k, v = (self._heads(t) for t in tf.split(self.qkv(self.norm1(x)), 3, axis=-1))
        steps = tf.shape(x)[1]
        if cache is None:
            keys, values = k, v
            visible = tf.linalg.band_part(tf.ones((steps, steps), tf.bool), -1, 0)
        elif cache_index.shape.rank == 1:  # One position per row: a scatter of [B*h] rows.
            batch, length = tf.shape(k)[0], tf.shape(cache[0])[2]
            rows = tf.repeat(tf.range(batch), self.num_heads)
            heads = tf.tile(tf.range(self.num_heads), [batch])
            at = tf.stack([rows, heads, tf.repeat(cache_index, self.num_heads)], axis=1)
            keys = tf.tensor_scatter_nd_update(cache[0], at, tf.reshape(k, [-1, self.head_dim]))
            values = tf.tensor_scatter_nd_update(cache[1], at, tf.reshape(v, [-1, self.head_dim]))
            visible = tf.range(length)[None, :] <= cache_index[:, None]  # [B, K]
            visible = visible[:, None, None, :]
        else:
            keys = write_positions(cache[0], k, cache_index)
            values = write_positions(cache[1], v, cache_index)
            visible = (tf.range(tf.shape(keys)[2])[None, :]
                       <= cache_index + tf.range(steps)[:, None])  # [T, K]
        if visible.shape.rank == 2:
            visible = visible[None, None]
        length = keys.shape[2]
        if cache is None or length is None or buckets < 2:
            out = self._attend(q, keys, values, visible, training)
        else:  # Only the filled part: the first width that holds it.
            widths = prefix_ends(length, buckets)
            last = tf.reduce_max(cache_index) + steps - 1
            out = tf.switch_case(  # Past the last width (never): the last branch, all of it.
                tf.reduce_sum(tf.cast(tf.constant(widths) <= last, tf.int32)),
                [lambda w=w: self._attend(q, keys[:, :, :w], values[:, :, :w],
                                          visible[..., :w], training) for w in widths])
        out = tf.transpose(out, [0, 2, 1, 3])
        x = x + self.drop(self.proj(tf.reshape(out, tf.shape(x))), training=training)
        y = x + self.drop(self.ffn_out(self.ffn_in(self.norm2(x))), training=training)
        return y if cache is None else (y, (keys, values))

    def _attend(self, q, keys, values, visible, training):
        """Masked attention of q [B, h, T, d] over keys, values [B, h, L, d]: [B, h, T, d]."""
        scores = tf.einsum("bhqd,bhkd->bhqk", q, keys) / math.sqrt(self.head_dim)
        scores = tf.where(visible, scores, tf.constant(NEG_INF, scores.dtype))
        # The softmax in float32 whatever the compute dtype (bfloat16 has 8 bits of mantissa).
        attn = tf.cast(tf.nn.softmax(tf.cast(scores, tf.float32), axis=-1), scores.dtype)
        return tf.einsum("bhqk,bhkd->bhqd", self.drop(attn, training=training), values)

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads, ffn_width=self.ffn_width, dropout=self.dropout,
                      kernel_dtype=self.kernel_dtype)
        return config


def code_bits(labels, logits):
    """Per-position negative log2-likelihood: the prior's reported metric."""
    ce = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    return ce / np.log(2.0)


@keras.saving.register_keras_serializable(package="ordered_vqvae")
class CodePrior(keras.Model):
    """p(c_1..c_K) = prod_i p(c_i | c_<i) over codes in 0..codebook_size-1."""

    def __init__(self, code_length: int, codebook_size: int, num_layers: int = 4,
                 num_heads: int = 8, width: int = 256, ffn_width: int = 1024,
                 dropout: float = 0.1, kernel_dtype=None, **kwargs):
        super().__init__(**kwargs)
        if code_length < 1 or codebook_size < 2:
            raise ValueError(f"code_length={code_length}, codebook_size={codebook_size}; "
                             "expected K >= 1 and a codebook of >= 2 codes")
        self.code_length, self.codebook_size = int(code_length), int(codebook_size)
        self.num_layers, self.num_heads, self.width = num_layers, num_heads, width
        self.ffn_width, self.dropout_rate = ffn_width, dropout
        self.kernel_dtype = kernel_dtype  # The blocks' projections; see `load_prior`.
        init = keras.initializers.TruncatedNormal(stddev=0.02)
        dtype = self.dtype_policy  # float32 by default; see `load_prior(dtype=)`.
        self.token_embedding = keras.layers.Embedding(codebook_size + 1, width,
                                                      embeddings_initializer=init, dtype=dtype,
                                                      name="token_embedding")
        self.blocks = [DecoderBlock(num_heads, ffn_width, dropout, kernel_dtype, dtype=dtype,
                                    name=f"block_{i}") for i in range(num_layers)]
        self.final_norm = keras.layers.LayerNormalization(epsilon=1e-5, dtype=dtype,
                                                          name="final_norm")
        self.head = keras.layers.Dense(codebook_size, dtype=dtype, name="head")
        self.embed_drop = keras.layers.Dropout(dropout, dtype=dtype)
        self.token_embedding.build((None, None))
        self.position_embedding = self.add_weight(name="position_embedding",
                                                  shape=(code_length, width), initializer=init)
        for block in self.blocks:
            block.build((None, None, width))
        self.final_norm.build((None, None, width))
        self.head.build((None, None, width))
        kernel_bytes = sum(int(np.prod(p.kernel.shape)) * tf.as_dtype(p.kernel.dtype).size
                           for p in self.projections)
        self.row_product_parts = ROW_PRODUCT_PARTS if kernel_bytes >= ROW_PRODUCT_MIN_BYTES else 1

    @property
    def projections(self) -> List[Projection]:
        return [p for b in self.blocks for p in (b.qkv, b.proj, b.ffn_in, b.ffn_out)]

    @property
    def row_product_parts(self) -> int:
        """How the blocks' projections compute one row under XLA (sampling at batch 1):
        in this many parts, or whole (1); see `row_matmul`. Read when a program is traced."""
        return max([p.row_parts for p in self.projections], default=1)

    @row_product_parts.setter
    def row_product_parts(self, parts: int):
        for projection in self.projections:
            projection.row_parts = int(parts)

    @classmethod
    def from_config_for(cls, config: PriorConfig, code_length: int, codebook_size: int):
        return cls(code_length, codebook_size, num_layers=config.num_layers,
                   num_heads=config.num_heads, width=config.width, ffn_width=config.ffn_width,
                   dropout=config.dropout)

    @property
    def start_token(self) -> int:
        return self.codebook_size

    def next_code_pairs(self, codes):
        """codes [B, K] -> (inputs, labels): the start token and codes 0..K-2, and the codes."""
        codes = tf.cast(codes, tf.int32)
        start = tf.fill([tf.shape(codes)[0], 1], self.start_token)
        return tf.concat([start, codes[:, :-1]], axis=1), codes

    def _embed(self, tokens, first_position, training):
        """tokens [B, T] at positions first_position.. (a scalar, or [B] with T = 1)."""
        # A gather, not a slice: under XLA a slice starting at the loop index read the
        # wrong rows here (TF 2.21).
        if first_position.shape.rank == 1:
            positions = tf.gather(self.position_embedding, first_position)[:, None]
        else:
            positions = tf.gather(self.position_embedding,
                                  first_position + tf.range(tf.shape(tokens)[1]))[None]
        return self.embed_drop(self.token_embedding(tokens) + positions, training=training)

    def call(self, tokens, training=False):
        """tokens int [B, T<=K] (start token first) -> logits float32 [B, T, codebook_size]."""
        x = self._embed(tokens, tf.constant(0), training)
        for block in self.blocks:
            x = block(x, training=training)
        return tf.cast(self.head(self.final_norm(x)), tf.float32)

    def init_cache(self, batch_size) -> List[Tuple[tf.Tensor, tf.Tensor]]:
        """Per block (keys, values), zeros [B, heads, K, head_dim]."""
        shape = [batch_size, self.num_heads, self.code_length, self.width // self.num_heads]
        dtype = self.compute_dtype
        return [(tf.zeros(shape, dtype), tf.zeros(shape, dtype)) for _ in self.blocks]

    @staticmethod
    def resize_cache(cache, length: int):
        """The cache holding positions 0..length-1 (a static length): cut, or padded with
        zeros. A sampler's one pass in segments grows it as it goes, so that its steps, which
        attend to all of the cache, read no position their segment cannot reach."""
        def resize(t):
            have = t.shape[2]
            if have >= length:
                return t[:, :, :length]
            return tf.pad(t, [[0, 0], [0, 0], [0, length - have], [0, 0]])
        return [(resize(keys), resize(values)) for keys, values in cache]

    def call_with_cache(self, tokens, cache, cache_index):
        """tokens int [B, T] at positions cache_index.. -> (logits [B, T, V], updated cache).
        `cache_index`: an int32 scalar (attending to all of the cache), or int32 [B] (one
        position per row, T = 1; attending in ATTENTION_BUCKETS widths)."""
        cache_index = tf.convert_to_tensor(cache_index, tf.int32)
        x = self._embed(tokens, cache_index, False)
        new_cache = []
        buckets = ATTENTION_BUCKETS if cache_index.shape.rank == 1 else 1
        for block, layer_cache in zip(self.blocks, cache):
            x, layer_cache = block(x, cache=layer_cache, cache_index=cache_index,
                                   buckets=buckets)
            new_cache.append(layer_cache)
        return tf.cast(self.head(self.final_norm(x)), tf.float32), new_cache

    def next(self, tokens, cache, index):
        """The sampler's step: the token [B] at position `index` (a scalar, or [B] per row)
        -> (logits [B, V], cache)."""
        logits, cache = self.call_with_cache(tokens[:, None], cache, index)
        return logits[:, 0], cache

    # -- training: a stock sparse cross-entropy through compile; logs in bits per code

    def compile(self, optimizer="adam", **kwargs):
        kwargs.setdefault("loss", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        kwargs.setdefault("metrics", [keras.metrics.MeanMetricWrapper(code_bits,
                                                                      name="bits_per_code")])
        super().compile(optimizer=optimizer, **kwargs)

    def compute_loss(self, *args, **kwargs):
        # The NaN guard: a NaN or Inf loss stops the step before any update.
        return finite_loss(super().compute_loss(*args, **kwargs), self.optimizer.iterations)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras's build from a peeked multi-worker batch fails (test_distributed shows it);
        # the shapes are known, so a stand-in batch builds the compiled loss and metrics.
        if data_batch is None:
            data_batch = self.next_code_pairs(tf.zeros([1, self.code_length], tf.int32))
        super()._maybe_symbolic_build(data_batch=data_batch)

    def train_step(self, data):
        return loggable(super().train_step(data))

    def test_step(self, data):
        return loggable(super().test_step(data))

    def bits_per_code(self, codes) -> float:
        """Mean negative log2-likelihood per code of codes int [N, K], or of a dataset of
        such batches."""
        batches = [codes] if isinstance(codes, (np.ndarray, tf.Tensor)) else codes
        total, count = 0.0, 0
        score = tf.function(lambda c: tf.reduce_sum(code_bits(c, self(self.next_code_pairs(c)[0]))))
        for batch in batches:
            batch = tf.cast(batch[0] if isinstance(batch, tuple) else batch, tf.int32)
            total += float(score(batch))
            count += int(tf.size(batch))
        if not count:
            raise ValueError("bits_per_code got no codes")
        return total / count

    def get_config(self):
        return {"code_length": self.code_length, "codebook_size": self.codebook_size,
                "num_layers": self.num_layers, "num_heads": self.num_heads, "width": self.width,
                "ffn_width": self.ffn_width, "dropout": self.dropout_rate, "name": self.name,
                **({"kernel_dtype": self.kernel_dtype} if self.kernel_dtype else {})}


PRIOR_CONFIG = "prior.json"
PRIOR_WEIGHTS = "prior.weights.h5"
# load_prior's precisions: (Keras dtype policy, the blocks' projection kernels).
PRIOR_DTYPES = {"float32": ("float32", None), "bfloat16": ("bfloat16", None),
                "bfloat16_weights": ("float32", "bfloat16")}


def save_prior(prior: CodePrior, directory: str) -> str:
    return artifacts.save_model_dir(prior, prior.get_config(), directory, PRIOR_CONFIG,
                                    PRIOR_WEIGHTS)


def load_prior(directory: str, dtype: str = "float32") -> CodePrior:
    """Reads a prior written by `save_prior` (by this or an earlier version).

    `dtype`: "float32" (the reference); "bfloat16": weights, activations and key/value
    cache in bfloat16, with the attention softmax and the logits in float32; or
    "bfloat16_weights": the decoder blocks' projection kernels in bfloat16 (nine tenths of
    the weights), everything else float32, each projection a bfloat16 product accumulated
    in float32. Which is faster depends on the hardware and the batch (see
    bench/sampler_speed.py); how far the samples drift, on the model (bench/bf16_drift.py).
    """
    check_choice("dtype", dtype, PRIOR_DTYPES)
    policy, kernel_dtype = PRIOR_DTYPES[dtype]

    def build(config: dict) -> CodePrior:
        prior = CodePrior.from_config({**config, "dtype": policy, "kernel_dtype": kernel_dtype})
        prior(tf.zeros((1, 1), tf.int32))
        return prior

    return artifacts.load_model_dir(directory, PRIOR_CONFIG, PRIOR_WEIGHTS, build, "prior",
                                    "ovqvae train_prior --force")
