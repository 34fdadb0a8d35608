"""Losses and statistics that mean the same under tf.distribute as on one device.

Under a tf.distribute strategy each replica holds a slice of the global batch and the
optimizer sums the replicas' gradients. A loss that is a mean over the batch therefore
enters as its per-replica mean divided by the number of replicas (`replica_share`), and a
mean over a data-dependent count (the codes kept by truncation) needs the count of the
whole global batch (`sum_over_replicas`), else replicas that kept fewer codes would weigh
more. Outside a strategy both are the identity.
"""

from __future__ import annotations

import tensorflow as tf


def num_replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


def replica_share(loss):
    """This replica's share of a mean loss: loss / replicas."""
    replicas = num_replicas()
    return loss if replicas == 1 else loss / replicas


def sum_over_replicas(value):
    """`value` summed over the replicas of the current step (in a replica context)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def loggable(logs: dict) -> dict:
    """`train_step` logs in a form Keras can reduce under every strategy: Keras 3 reduces
    them across MultiWorkerMirroredStrategy workers with `reduce("MEAN", v, axis=0)`, which
    fails on scalars (tensorflow/tensorflow#72388), so there they become shape [1]."""
    if not isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return logs
    return {name: tf.reshape(value, [1]) for name, value in logs.items()}
