"""Batch normalization on TensorFlow's fused kernel."""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="ordered_vqvae")
class BatchNormalization(keras.layers.BatchNormalization):
    """Keras' BatchNormalization (synchronized across replicas), computing training-mode
    statistics on one replica with TensorFlow's fused kernel.

    Keras 3 normalizes with separate moment, subtract and scale ops; `FusedBatchNormV3` (what
    Keras 2 used) does it, and its gradient, in one pass over the activations, which trains
    the autoencoder faster on CPU (bench/train_throughput.py, docs/performance.md). The result is the
    same layer: the same weights and names (checkpoints and weight files load either way),
    and moving statistics updated with the biased batch variance, as Keras does. Inference,
    inputs that are not float32 NHWC, and training under several replicas (whose statistics
    are synchronized) take Keras' own path.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("synchronized", True)
        super().__init__(**kwargs)

    def _fused(self, inputs, training) -> bool:
        context = tf.distribute.get_replica_context()
        return (training and self.trainable and len(inputs.shape) == 4 and self.axis in (-1, 3)
                and inputs.dtype == tf.float32 and self.scale and self.center
                and not self.renorm and context is not None
                and context.num_replicas_in_sync == 1)

    def call(self, inputs, training=None, mask=None):
        if mask is not None or not self._fused(inputs, training):
            return super().call(inputs, training=training, mask=mask)
        outputs, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=self.gamma, offset=self.beta, mean=tf.constant([], tf.float32),
            variance=tf.constant([], tf.float32), epsilon=self.epsilon, data_format="NHWC",
            is_training=True, exponential_avg_factor=1.0)
        # The kernel returns the unbiased (Bessel-corrected) variance; Keras averages the
        # biased one.
        count = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], tf.float32)
        variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(self.moving_variance * momentum
                                    + variance * (1.0 - momentum))
        return outputs
