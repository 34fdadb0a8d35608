"""Learning-rate schedules of the two training recipes."""

from __future__ import annotations

import math
from typing import Optional

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="ordered_vqvae")
class InverseSqrtSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak` over `warmup_steps`, then peak * sqrt(warmup / step)."""

    def __init__(self, peak: float, warmup_steps: int):
        self.peak, self.warmup_steps = float(peak), max(int(warmup_steps), 1)

    def __call__(self, step):
        step = tf.cast(step, tf.float32) + 1.0
        warm = float(self.warmup_steps)
        return self.peak * tf.minimum(step / warm, tf.sqrt(warm / step))

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps}


@keras.saving.register_keras_serializable(package="ordered_vqvae")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak` over `warmup_steps`, then peak * (1 + cos(pi * p)) / 2 at
    progress p in [0, 1]: the larger of step / `total_steps` and the `progress` variable,
    which `fit_stages` advances with the stage's time budget. So the rate reaches 0 when the
    steps or the time run out, whichever comes first, and a run stopped on time has
    annealed its weights as a run of the same steps planned in advance would."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int,
                 progress: Optional[tf.Variable] = None):
        self.peak, self.warmup_steps = float(peak), int(warmup_steps)
        self.total_steps, self.progress = max(int(total_steps), 1), progress

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        p = step / float(self.total_steps)
        if self.progress is not None:
            p = tf.maximum(p, tf.cast(self.progress, tf.float32))
        warm = tf.minimum((step + 1.0) / float(max(self.warmup_steps, 1)), 1.0)
        return self.peak * warm * 0.5 * (1.0 + tf.cos(math.pi * tf.clip_by_value(p, 0.0, 1.0)))

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps}
