"""Vector quantization with a straight-through estimator (van den Oord et al., 2017)."""

from __future__ import annotations

import keras
import tensorflow as tf

from ordered_vqvae.replicas import num_replicas, sum_over_replicas
from ordered_vqvae.validation import check_at_least, check_between


@tf.custom_gradient
def straight_through(inputs, quantized):
    """Returns `quantized` in the forward pass; the gradient flows to `inputs` unchanged.

    `quantized` receives no gradient through this path: the codebook learns from its own
    loss term (or from EMA updates).
    """

    def grad(upstream):
        return upstream, tf.zeros_like(quantized)

    return tf.identity(quantized), grad


@keras.saving.register_keras_serializable(package="ordered_vqvae")
class VectorQuantizer(keras.layers.Layer):
    """Nearest-codeword quantization of vectors [..., D] against a [codebook_size, D] codebook.

    One call returns a dict serving training, metrics and code extraction:
      quantized: float32 [..., D], the chosen codewords with a straight-through gradient.
      indices: int32 [...], the chosen codeword per vector.
      codebook_loss: mean ||sg[x] - e||^2 (0 with EMA updates, which replace it).
      commitment_loss: beta * mean ||x - sg[e]||^2.
      loss: codebook_loss + commitment_loss.
      perplexity: exp(entropy of codeword usage in this batch), 1..codebook_size.
      usage: fraction of the codebook used in this batch, in [0, 1].
      restarted: number of dead codewords re-seeded in this call (training only).

    Args:
      codebook_size: codebook size (>= 2).
      embedding_dim: vector length D.
      beta: commitment weight.
      use_ema: update the codebook by exponential moving averages of assigned vectors
        (training only) instead of by gradient.
      ema_decay, epsilon: EMA decay and Laplace smoothing of the cluster sizes.
      dead_code_steps: when > 0, a codeword unused for this many consecutive training
        calls is re-seeded from a random vector of the current batch.
    """

    def __init__(self, codebook_size: int, embedding_dim: int, beta: float = 0.25,
                 use_ema: bool = False, ema_decay: float = 0.99, epsilon: float = 1e-5,
                 dead_code_steps: int = 0, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        check_at_least("codebook_size", int(codebook_size), 2, "a codebook of >= 2 codewords")
        check_at_least("embedding_dim", int(embedding_dim), 1)
        check_between("ema_decay", ema_decay, 0.0, 1.0, low_open=True, high_open=True)
        self.codebook_size = int(codebook_size)
        self.embedding_dim = int(embedding_dim)
        self.beta = float(beta)
        self.use_ema = bool(use_ema)
        self.ema_decay = float(ema_decay)
        self.epsilon = float(epsilon)
        self.dead_code_steps = int(dead_code_steps)
        self.seed = int(seed)
        self._seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        if input_shape[-1] != self.embedding_dim:
            raise ValueError(f"VectorQuantizer expects vectors of size embedding_dim="
                             f"{self.embedding_dim} in the last axis, got shape {input_shape}")
        limit = 1.0 / self.codebook_size
        self.codebook = self.add_weight(
            name="codebook", shape=(self.codebook_size, self.embedding_dim),
            initializer=keras.initializers.RandomUniform(-limit, limit, seed=self.seed),
            trainable=not self.use_ema)
        if self.use_ema:
            self.ema_cluster_size = self.add_weight(
                name="ema_cluster_size", shape=(self.codebook_size,), initializer="zeros",
                trainable=False)
            self.ema_sum = self.add_weight(
                name="ema_sum", shape=(self.codebook_size, self.embedding_dim),
                initializer="zeros", trainable=False)
        self.steps_unused = self.add_weight(
            name="steps_unused", shape=(self.codebook_size,), initializer="zeros",
            trainable=False)

    def distances(self, flat):
        """Squared L2 distances [M, codebook_size] from vectors [M, D], as one matmul."""
        return tf.reduce_sum(flat * flat, axis=1, keepdims=True) + self._shifted_distances(flat)

    def _shifted_distances(self, flat):
        """The distances less ||x||^2, which is the same for every codeword: what the
        nearest-codeword search needs, with one pass fewer over [M, codebook_size]."""
        codebook = tf.convert_to_tensor(self.codebook)
        return (tf.reduce_sum(codebook * codebook, axis=1)[None, :]
                - 2.0 * tf.matmul(flat, codebook, transpose_b=True))

    def lookup(self, indices):
        """Codewords [..., D] for int indices [...]: the decode path.

        (Named `lookup`, not `quantize`: Keras 3 reserves `Layer.quantize(mode)` for weight
        quantization and wraps any method of that name.)
        """
        return tf.gather(tf.convert_to_tensor(self.codebook), tf.cast(indices, tf.int32))

    def call(self, inputs, loss_mask=None, training=False):
        """Quantizes `inputs` [..., D]; `loss_mask` [...] (0/1 or weights) selects the vectors
        that count in the losses, statistics and codebook updates (all when None)."""
        inputs = tf.convert_to_tensor(inputs, tf.float32)
        lead_shape = tf.shape(inputs)[:-1]
        flat = tf.reshape(inputs, [-1, self.embedding_dim])
        weights = (tf.ones(tf.shape(flat)[:1]) if loss_mask is None
                   else tf.reshape(tf.cast(loss_mask, tf.float32), [-1]))
        # Losses are means over the counted vectors of the global batch: under
        # tf.distribute, replica r contributes sum_r / (total / replicas), and the replicas'
        # mean is the single-device value (see ordered_vqvae.replicas).
        total = tf.maximum(sum_over_replicas(tf.reduce_sum(weights)) / num_replicas(), 1.0)

        indices = tf.argmin(self._shifted_distances(flat), axis=1, output_type=tf.int32)
        counts = sum_over_replicas(
            tf.math.unsorted_segment_sum(weights, indices, self.codebook_size))
        quantized_flat = self.lookup(indices)  # Read before any codebook update below.
        restarted = tf.constant(0.0)
        if training:
            if self.use_ema:
                self._ema_update(flat, indices, weights, counts)
            if self.dead_code_steps > 0:
                if num_replicas() > 1:
                    raise ValueError(f"dead_code_steps={self.dead_code_steps} re-seeds codewords "
                                     "from one replica's batch; use 0 under tf.distribute")
                restarted = self._restart_dead_codes(flat, weights, counts)

        per_vector = tf.reduce_mean(tf.square(flat - tf.stop_gradient(quantized_flat)), axis=1)
        commitment = self.beta * tf.reduce_sum(per_vector * weights) / total
        if self.use_ema:
            codebook_loss = tf.constant(0.0)
        else:
            cb = tf.reduce_mean(tf.square(tf.stop_gradient(flat) - quantized_flat), axis=1)
            codebook_loss = tf.reduce_sum(cb * weights) / total

        probs = counts / tf.maximum(tf.reduce_sum(counts), 1.0)
        perplexity = tf.exp(-tf.reduce_sum(probs * tf.math.log(probs + 1e-10)))
        usage = tf.reduce_mean(tf.cast(counts > 0, tf.float32))
        quantized = straight_through(flat, quantized_flat)
        out_shape = tf.concat([lead_shape, [self.embedding_dim]], axis=0)
        return {
            "quantized": tf.reshape(quantized, out_shape),
            "indices": tf.reshape(indices, lead_shape),
            "codebook_loss": codebook_loss,
            "commitment_loss": commitment,
            "loss": codebook_loss + commitment,
            "perplexity": perplexity,
            "usage": usage,
            "restarted": restarted,
        }

    def _ema_update(self, flat, indices, weights, counts):
        d = self.ema_decay
        self.ema_cluster_size.assign(d * self.ema_cluster_size + (1 - d) * counts)
        sums = sum_over_replicas(tf.math.unsorted_segment_sum(flat * weights[:, None], indices,
                                                              self.codebook_size))
        self.ema_sum.assign(d * self.ema_sum + (1 - d) * sums)
        n = tf.reduce_sum(self.ema_cluster_size)
        smoothed = (self.ema_cluster_size + self.epsilon) / (n + self.codebook_size * self.epsilon) * n
        self.codebook.assign(self.ema_sum / smoothed[:, None])

    def _restart_dead_codes(self, flat, weights, counts):
        unused = tf.where(counts > 0, 0.0, self.steps_unused + 1.0)
        dead = unused >= float(self.dead_code_steps)
        # Re-seed each dead codeword from a random counted vector of this batch.
        logits = tf.math.log(tf.maximum(weights, 1e-30))[None, :]
        seed = keras.random.randint((2,), 0, 2**30, seed=self._seed_generator, dtype="int32")
        picks = tf.random.stateless_categorical(logits, self.codebook_size, seed)[0]
        candidates = tf.gather(flat, picks)
        self.codebook.assign(tf.where(dead[:, None], candidates, self.codebook))
        if self.use_ema:
            self.ema_sum.assign(tf.where(dead[:, None], candidates, self.ema_sum))
            self.ema_cluster_size.assign(tf.where(dead, 1.0, self.ema_cluster_size))
        self.steps_unused.assign(tf.where(dead, 0.0, unused))
        return tf.reduce_sum(tf.cast(dead, tf.float32))

    def get_config(self):
        config = super().get_config()
        config.update(codebook_size=self.codebook_size, embedding_dim=self.embedding_dim,
                      beta=self.beta, use_ema=self.use_ema, ema_decay=self.ema_decay,
                      epsilon=self.epsilon, dead_code_steps=self.dead_code_steps, seed=self.seed)
        return config
