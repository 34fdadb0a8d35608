"""Training the ordered VQ-VAE and the code prior: checkpoints with resume, NaN guard, logs.

`train_autoencoder` runs the single-stage ordered recipe or the reference two-stage recipe
(pretrain with full codes, then ordered fine-tuning at a lower learning rate);
`train_prior` fits a CodePrior on code batches. Both go through `fit_stages`: Keras `fit`
with a progress bar, TensorBoard scalars (reconstruction MSE at 25/50/75/100% of K,
codebook perplexity, bits per code) and a checkpoint with the optimizer state after every
epoch, from which `resume=True` continues.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from ordered_vqvae.configs import AutoencoderConfig
from ordered_vqvae.models import NONFINITE_LOSS, OrderedVQVAE, fraction_lengths


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


def image_batches(images: np.ndarray, batch_size: int, shuffle: bool, seed: int,
                  drop_remainder: bool = True) -> tf.data.Dataset:
    """A batched dataset over float32 images [N,H,W,C] in [0,1] held in memory.

    tf.data autotuning is off: on 2 cores it competed with training for CPU and halved
    throughput in most runs.
    """
    ds = tf.data.Dataset.from_tensor_slices(images)
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(2)
    options = tf.data.Options()
    options.autotune.enabled = False
    options.deterministic = True
    return ds.with_options(options)


def check_images(images: np.ndarray, expected_shape, what: str = "images") -> None:
    """Raises ValueError naming the problem when images are not [N, *expected_shape] in [0,1]."""
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(expected_shape):
        raise ValueError(f"{what} have shape {images.shape}, expected [N, "
                         f"{', '.join(map(str, expected_shape))}]")
    if len(images) == 0:
        raise ValueError(f"{what} are empty, expected at least one image")
    bad = ~np.isfinite(images)
    if bad.any():
        raise ValueError(f"{what} contain NaN or Inf at image index {int(np.argwhere(bad)[0][0])}")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{what} have values in [{lo:g}, {hi:g}], expected [0, 1]")


class _Position(keras.callbacks.Callback):
    """Remembers the current epoch and batch, to say where training diverged."""

    def __init__(self):
        super().__init__()
        self.epoch = self.batch = self.step = 0

    def on_train_begin(self, logs=None):
        self.step = int(self.model.optimizer.iterations.numpy())

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.batch = batch
        self.step += 1


class _CodeLengthMSE(keras.callbacks.Callback):
    """Adds validation MSE at 25/50/75/100% of K to the epoch logs (and so to TensorBoard)."""

    def __init__(self, images: np.ndarray):
        super().__init__()
        self.images = images

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self.images is None:
            return
        lengths = fraction_lengths(self.model.code_length)
        for (frac, k), mse in zip(zip((25, 50, 75, 100), lengths),
                                  self.model.mse_by_length(self.images, lengths).values()):
            logs[f"val_mse_{frac}pct"] = mse


class _EpochCheckpoint(keras.callbacks.Callback):
    """Saves model, optimizer and the finished-epoch counter after every epoch."""

    def __init__(self, manager: tf.train.CheckpointManager, epoch_var: tf.Variable):
        super().__init__()
        self.manager = manager
        self.epoch_var = epoch_var

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_var.assign(epoch + 1)
        self.manager.save(checkpoint_number=epoch + 1)


@dataclasses.dataclass
class Stage:
    """A run of epochs with one fresh optimizer: epochs up to `end` (counted from the
    start of training); `prepare(model, optimizer)` sets the model up and compiles it."""

    name: str
    end: int
    make_optimizer: Callable[[], keras.optimizers.Optimizer]
    prepare: Callable[[keras.Model, keras.optimizers.Optimizer], None]
    description: str = ""


def _check_fresh_or_resume(workdir: str, resume: bool) -> None:
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not resume and tf.io.gfile.exists(ckpt_dir) and tf.train.latest_checkpoint(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; pass resume=True "
                              "(--resume) to continue, or use a fresh workdir")


def fit_stages(model: keras.Model, stages: Sequence[Stage], train_ds, workdir: str, what: str,
               resume: bool = False, verbose: int = 1, callbacks: Sequence = (),
               steps_per_epoch: Optional[int] = None, validation_data=None) -> list:
    """Runs `stages` with `model.fit`, checkpointing model, optimizer and epoch after every
    epoch under `workdir/checkpoints`; with `resume` continues from the latest checkpoint.

    A NaN or Inf loss (models raise NONFINITE_LOSS) becomes TrainingDiverged naming the
    step; the last good checkpoint stays. Returns the history, also in workdir/history.json.
    """
    _check_fresh_or_resume(workdir, resume)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    history = []
    history_path = os.path.join(workdir, "history.json")
    if resume and tf.io.gfile.exists(history_path):
        with tf.io.gfile.GFile(history_path) as f:
            history = json.load(f)
    first = 0
    for stage in stages:
        optimizer = stage.make_optimizer()
        optimizer.build(model.trainable_variables)
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var)
        manager = tf.train.CheckpointManager(checkpoint, ckpt_dir, max_to_keep=3)
        latest = manager.latest_checkpoint if resume else None
        if latest:
            # Weights always; the optimizer only when resuming inside this stage, since a
            # new stage starts with a fresh optimizer, as an uninterrupted run does.
            tf.train.Checkpoint(model=model, epoch=epoch_var).restore(latest).expect_partial()
            if int(epoch_var.numpy()) > first:
                checkpoint.restore(latest).expect_partial()
        done = int(epoch_var.numpy())
        stage_first, first = first, stage.end
        if done >= stage.end:
            continue
        initial = max(stage_first, done)
        if verbose:
            print(f"[{what}] stage '{stage.name}': epochs {initial + 1}..{stage.end} of "
                  f"{stages[-1].end}{', ' + stage.description if stage.description else ''}",
                  flush=True)
        stage.prepare(model, optimizer)
        position = _Position()
        all_callbacks = [position, *callbacks, _EpochCheckpoint(manager, epoch_var),
                         keras.callbacks.TensorBoard(os.path.join(workdir, "tensorboard"),
                                                     write_graph=False)]
        try:
            result = model.fit(train_ds, epochs=stage.end, initial_epoch=initial,
                               callbacks=all_callbacks, verbose=verbose,
                               steps_per_epoch=steps_per_epoch, shuffle=False,
                               validation_data=validation_data)
        except tf.errors.InvalidArgumentError as e:
            if NONFINITE_LOSS not in str(e):
                raise
            raise TrainingDiverged(
                f"the training loss became NaN or Inf at step {position.step} (epoch "
                f"{position.epoch + 1}, batch {position.batch + 1}); the last good checkpoint "
                f"is {manager.latest_checkpoint or 'none (no epoch finished)'}") from None
        for i in range(len(result.epoch)):
            history.append({"epoch": result.epoch[i] + 1, "stage": stage.name,
                            **{k: float(v[i]) for k, v in result.history.items()}})
        tmp = history_path + ".tmp"
        with tf.io.gfile.GFile(tmp, "w") as f:
            json.dump(history, f, indent=1)
        tf.io.gfile.rename(tmp, history_path, overwrite=True)
    return history


def _autoencoder_stages(config: AutoencoderConfig):
    def stage(name, end, truncation, lr):
        def prepare(model, optimizer):
            model.truncation.distribution = truncation
            model.compile(optimizer=optimizer)

        return Stage(name, end, lambda: keras.optimizers.Adam(lr), prepare,
                     f"truncation={truncation}, lr={lr:g}")

    if config.pretrain_epochs:
        return [stage("pretrain", config.pretrain_epochs, "none", config.learning_rate),
                stage("ordered finetune", config.pretrain_epochs + config.epochs,
                      config.truncation, config.finetune_learning_rate)]
    name = "ordered" if config.truncation != "none" else "unordered"
    return [stage(name, config.epochs, config.truncation, config.learning_rate)]


def train_autoencoder(config: AutoencoderConfig, train_images: np.ndarray,
                      val_images: Optional[np.ndarray], workdir: str, resume: bool = False,
                      verbose: int = 1, steps_per_epoch: Optional[int] = None) -> OrderedVQVAE:
    """Trains an ordered VQ-VAE on images [N,H,W,C] in [0,1]; checkpoints under workdir.

    Args:
      resume: continue from the latest checkpoint in `workdir/checkpoints` (model,
        optimizer and epoch); without it an existing checkpoint directory is an error.
      steps_per_epoch: cap the steps of each epoch (for short runs and tests).

    Returns:
      The trained model. `workdir/history.json` holds the per-epoch logs.
    """
    check_images(train_images, config.image_shape, "training images")
    if val_images is not None:
        check_images(val_images, config.image_shape, "validation images")
    if len(train_images) < config.batch_size:
        raise ValueError(f"{len(train_images)} training images, expected at least "
                         f"batch_size={config.batch_size}")
    keras.utils.set_random_seed(config.seed)
    model = OrderedVQVAE(config)
    model(tf.zeros((1,) + tuple(config.image_shape)))
    train_ds = image_batches(train_images, config.batch_size, shuffle=True, seed=config.seed)
    fit_stages(model, _autoencoder_stages(config), train_ds, workdir, "train autoencoder",
               resume=resume, verbose=verbose, callbacks=[_CodeLengthMSE(val_images)],
               steps_per_epoch=steps_per_epoch)
    model.truncation.distribution = config.truncation
    return model


def train_prior(config, code_length: int, codebook_size: int, train_codes: tf.data.Dataset,
                val_codes: Optional[tf.data.Dataset], workdir: str, resume: bool = False,
                verbose: int = 1, steps_per_epoch: Optional[int] = None):
    """Trains a CodePrior (a `prior.PriorConfig`) on batches of codes int32 [B, K].

    AdamW (0.9, 0.98) with an inverse-square-root warm-up, as in the reference; validation
    negative log-likelihood is logged as `val_bits_per_code`. Checkpoints and `resume` as
    for the autoencoder.
    """
    from ordered_vqvae.prior import CodePrior, InverseSqrtSchedule

    keras.utils.set_random_seed(config.seed)
    model = CodePrior.from_config_for(config, code_length, codebook_size)

    def make_optimizer():
        return keras.optimizers.AdamW(InverseSqrtSchedule(config.learning_rate, config.warmup_steps),
                                      weight_decay=config.weight_decay, beta_1=0.9, beta_2=0.98,
                                      clipnorm=1.0)

    def prepare(m, optimizer):
        m.compile(optimizer=optimizer)

    stage = Stage("prior", config.epochs, make_optimizer, prepare,
                  f"lr={config.learning_rate:g} (warm-up {config.warmup_steps} steps)")
    fit_stages(model, [stage], train_codes, workdir, "train prior", resume=resume,
               verbose=verbose, steps_per_epoch=steps_per_epoch, validation_data=val_codes)
    return model
