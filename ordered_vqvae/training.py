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
import shutil
import tempfile
from typing import Callable, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from ordered_vqvae.configs import AutoencoderConfig
from ordered_vqvae.models import NONFINITE_LOSS, OrderedVQVAE, fraction_lengths


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
    """tf.data autotuning off: on 2 cores it competed with training for CPU and halved
    throughput in most runs."""
    options = tf.data.Options()
    options.autotune.enabled = False
    options.deterministic = True
    return ds.with_options(options)


@dataclasses.dataclass
class TrainingData:
    """In-memory training examples [N, ...] and how they are batched, as a pure function of
    (seed, epoch): each epoch is a fresh permutation drawn from that pair, so a run resumed
    mid-epoch and a distributed run see exactly the global batches of an uninterrupted
    single-device run.

    `side(step, batch_size)`, when given, returns per-example extras for one global batch
    (the autoencoder's code lengths); elements are then {"image": batch, **extras}. Extras
    are drawn for the whole global batch before it is split between workers and replicas.
    """

    examples: np.ndarray
    batch_size: int
    seed: int = 0
    steps_per_epoch: Optional[int] = None
    side: Optional[Callable] = None

    def __post_init__(self):
        full = len(self.examples) // self.batch_size
        if full < 1:
            raise ValueError(f"{len(self.examples)} training examples, expected at least "
                             f"batch_size={self.batch_size}")
        self.steps_per_epoch = min(full, self.steps_per_epoch or full)

    def dataset(self, first_epoch: int, end_epoch: int, skip: int = 0, shard: int = 0,
                num_shards: int = 1, per_replica: Optional[int] = None) -> tf.data.Dataset:
        """Batches of epochs first_epoch..end_epoch-1 after dropping `skip` batches; with
        `num_shards` > 1 only shard `shard` of each global batch, split into batches of
        `per_replica`."""
        n, gb, spe = len(self.examples), self.batch_size, self.steps_per_epoch
        if gb % num_shards:
            raise ValueError(f"batch_size={gb} does not split into {num_shards} input pipelines")
        examples = tf.constant(self.examples)
        seed = tf.constant(self.seed, tf.int64)

        def epoch(e):
            perm = tf.argsort(tf.random.stateless_uniform([n], tf.stack([seed, e])))
            steps = e * spe + tf.range(spe, dtype=tf.int64)
            return tf.data.Dataset.from_tensor_slices((steps, tf.reshape(perm[:spe * gb], [spe, gb])))

        lo, hi = shard * gb // num_shards, (shard + 1) * gb // num_shards

        def element(step, index):
            batch = tf.gather(examples, index[lo:hi])
            if self.side is None:
                return batch
            extras = self.side(tf.stack([seed, step]), gb)
            return {"image": batch, **{k: v[lo:hi] for k, v in extras.items()}}

        ds = tf.data.Dataset.range(first_epoch, end_epoch).flat_map(epoch).skip(skip).map(element)
        if per_replica and per_replica < hi - lo:
            ds = ds.unbatch().batch(per_replica, drop_remainder=True)
        return _options(ds.prefetch(2))

    def distributed(self, strategy, first_epoch: int, end_epoch: int, skip: int = 0):
        """`dataset` for `fit` under `strategy`: each input pipeline (worker) reads its own
        slice of every global batch."""
        if not tf.distribute.has_strategy():
            return self.dataset(first_epoch, end_epoch, skip)
        return strategy.distribute_datasets_from_function(
            lambda ctx: self.dataset(first_epoch, end_epoch, skip, ctx.input_pipeline_id,
                                     ctx.num_input_pipelines,
                                     ctx.get_per_replica_batch_size(self.batch_size)))


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
    """Tracks where training is (epoch, batch in epoch, optimizer step), to say where it
    diverged; saves a checkpoint every `every` batches, and at every epoch end records the
    epoch's logs and saves one. Runs after the other callbacks, which may add logs."""

    def __init__(self, save: Callable[[int, int], None], record: Callable[[int, dict], None],
                 every: int, first_batch: int = 0):
        super().__init__()
        self.save, self.record, self.every, self.first_batch = save, record, every, first_batch
        self.epoch = self.batch = self.step = 0

    def on_train_begin(self, logs=None):
        self.step = int(self.model.optimizer.iterations.numpy())

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.batch = self.first_batch + batch
        self.step += 1

    def on_train_batch_end(self, batch, logs=None):
        if self.every and (self.batch + 1) % self.every == 0:
            self.save(self.epoch, self.batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        self.record(epoch, logs or {})
        self.save(epoch + 1, 0)
        self.first_batch = 0


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
                              "to continue, or use a fresh workdir")


def _is_chief(strategy) -> bool:
    """Whether this process writes checkpoints, logs and history (all but multi-worker
    non-chief workers)."""
    return bool(getattr(strategy.extended, "should_checkpoint", True))


def _write_json_atomically(path: str, value) -> None:
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        json.dump(value, f, indent=1)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def _seed_states(model: keras.Model) -> list:
    """The state of the model's random generators (dropout, truncation), which the model's
    own checkpoint leaves out; restoring them makes a resumed run draw the same masks."""
    return [v.value for v in model.non_trainable_variables
            if v.path.endswith("seed_generator_state")]


def fit_stages(model: keras.Model, stages: Sequence[Stage], data: TrainingData, workdir: str,
               what: str, resume: bool = False, verbose: int = 1, callbacks: Sequence = (),
               validation_data=None, checkpoint_every: int = 0) -> list:
    """Runs `stages` with `model.fit` on `data`, checkpointing model, optimizer and position
    under `workdir/checkpoints` at every epoch end and every `checkpoint_every` batches (0:
    epoch ends only); with `resume` it continues from the latest checkpoint, mid-epoch
    included, on exactly the batches an uninterrupted run would have seen.

    Runs under the current tf.distribute strategy (build the model in its scope); only the
    chief writes to `workdir`. A NaN or Inf loss (models raise NONFINITE_LOSS) becomes
    TrainingDiverged naming the step; the last good checkpoint stays. Returns the history
    (also in workdir/history.json); after a resume mid-epoch, that epoch's logged training
    means cover only the batches run since.
    """
    _check_fresh_or_resume(workdir, resume)
    strategy = tf.distribute.get_strategy()
    chief = _is_chief(strategy)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    save_dir = ckpt_dir if chief else tempfile.mkdtemp(prefix="ovqvae-worker-")
    spe = data.steps_per_epoch
    with strategy.scope():
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
        batch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    history = []
    history_path = os.path.join(workdir, "history.json")
    if resume and tf.io.gfile.exists(history_path):
        with tf.io.gfile.GFile(history_path) as f:
            history = json.load(f)

    def record(epoch, logs, stage):
        history.append({"epoch": epoch + 1, "stage": stage,
                        **{k: float(v) for k, v in logs.items()}})
        if chief:
            _write_json_atomically(history_path, history)

    first = 0
    try:
        for stage in stages:
            with strategy.scope():
                optimizer = stage.make_optimizer()
                optimizer.build(model.trainable_variables)
            checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var,
                                             batch=batch_var, seeds=_seed_states(model))
            manager = tf.train.CheckpointManager(checkpoint, save_dir, max_to_keep=3)
            latest = tf.train.latest_checkpoint(ckpt_dir) if resume else None
            if latest:
                # Weights always; the optimizer only when resuming inside this stage, since
                # a new stage starts with a fresh optimizer, as an uninterrupted run does.
                tf.train.Checkpoint(model=model, epoch=epoch_var, batch=batch_var,
                                    seeds=_seed_states(model)).restore(latest).expect_partial()
                if (int(epoch_var.numpy()), int(batch_var.numpy())) > (first, 0):
                    checkpoint.restore(latest).expect_partial()
            done, done_batches = int(epoch_var.numpy()), int(batch_var.numpy())
            # A kill between logging an epoch and checkpointing it leaves an extra entry.
            history[:] = [h for h in history if h["epoch"] <= done]
            stage_first, first = first, stage.end
            if done >= stage.end:
                continue
            initial = max(stage_first, done)
            skip = done_batches if initial == done else 0
            if verbose:
                at = f" (from batch {skip + 1} of {spe})" if skip else ""
                print(f"[{what}] stage '{stage.name}': epochs {initial + 1}..{stage.end} of "
                      f"{stages[-1].end}{at}"
                      f"{', ' + stage.description if stage.description else ''}", flush=True)
            stage.prepare(model, optimizer)

            def save(epoch, batch, manager=manager):
                epoch_var.assign(epoch)
                batch_var.assign(batch)
                manager.save(checkpoint_number=epoch * spe + batch)

            position = _Position(save, lambda e, logs, name=stage.name: record(e, logs, name),
                                 checkpoint_every, skip)
            board = os.path.join(workdir if chief else save_dir, "tensorboard")
            all_callbacks = [*callbacks, keras.callbacks.TensorBoard(board, write_graph=False),
                             position]
            # A resume mid-epoch first finishes that epoch, then runs whole ones.
            runs = ([(initial, initial + 1, skip), (initial + 1, stage.end, 0)] if skip
                    else [(initial, stage.end, 0)])
            for begin, end, skip_batches in runs:
                if begin >= end:
                    continue
                try:
                    model.fit(data.distributed(strategy, begin, end, skip_batches), epochs=end,
                              initial_epoch=begin, callbacks=all_callbacks, verbose=verbose,
                              steps_per_epoch=spe - skip_batches, shuffle=False,
                              validation_data=validation_data)
                except tf.errors.InvalidArgumentError as e:
                    if NONFINITE_LOSS not in str(e):
                        raise
                    raise TrainingDiverged(
                        f"the training loss became NaN or Inf at step {position.step} (epoch "
                        f"{position.epoch + 1}, batch {position.batch + 1}); the last good "
                        f"checkpoint is {tf.train.latest_checkpoint(ckpt_dir) or 'none'}"
                    ) from None
    finally:
        if not chief:
            shutil.rmtree(save_dir, ignore_errors=True)
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


def autoencoder_stream(model: OrderedVQVAE, images: np.ndarray,
                       steps_per_epoch: Optional[int] = None) -> TrainingData:
    """The autoencoder's training stream: image batches with the code lengths that the
    model's truncation draws for them (at the distribution current when it is iterated)."""
    config = model.config
    return TrainingData(images, config.batch_size, config.seed, steps_per_epoch,
                        side=lambda seed, n: {"lengths": model.truncation.sample_lengths(
                            n, seed=tf.cast(seed, tf.int32))})


def train_autoencoder(config: AutoencoderConfig, train_images: np.ndarray,
                      val_images: Optional[np.ndarray], workdir: str, resume: bool = False,
                      verbose: int = 1, steps_per_epoch: Optional[int] = None,
                      checkpoint_every: int = 0, strategy=None) -> OrderedVQVAE:
    """Trains an ordered VQ-VAE on images [N,H,W,C] in [0,1]; checkpoints under workdir.

    Args:
      resume: continue from the latest checkpoint in `workdir/checkpoints` (model,
        optimizer and epoch); without it an existing checkpoint directory is an error.
      steps_per_epoch: cap the steps of each epoch (for short runs and tests).
      checkpoint_every: also checkpoint every this many batches (0: at epoch ends only).
      strategy: a tf.distribute strategy to train under (default: the current one);
        `config.batch_size` is the global batch, split between replicas.

    Returns:
      The trained model. `workdir/history.json` holds the per-epoch logs.
    """
    check_images(train_images, config.image_shape, "training images")
    if val_images is not None:
        check_images(val_images, config.image_shape, "validation images")
    keras.utils.set_random_seed(config.seed)
    with (strategy or tf.distribute.get_strategy()).scope():
        model = OrderedVQVAE(config)
        model(tf.zeros((1,) + tuple(config.image_shape)))
        data = autoencoder_stream(model, train_images, steps_per_epoch)
        fit_stages(model, _autoencoder_stages(config), data, workdir, "train autoencoder",
                   resume=resume, verbose=verbose, callbacks=[_CodeLengthMSE(val_images)],
                   checkpoint_every=checkpoint_every)
    model.truncation.distribution = config.truncation
    return model


def train_prior(config, code_length: int, codebook_size: int, train_codes: np.ndarray,
                val_codes: Optional[tf.data.Dataset], workdir: str, resume: bool = False,
                verbose: int = 1, steps_per_epoch: Optional[int] = None,
                checkpoint_every: int = 0, strategy=None):
    """Trains a CodePrior (a `prior.PriorConfig`) on codes int32 [N, K] held in memory.

    AdamW (0.9, 0.98) with an inverse-square-root warm-up, as in the reference; validation
    negative log-likelihood (batches of codes) is logged as `val_bits_per_code`.
    Checkpoints, `resume`, `checkpoint_every` and `strategy` as for the autoencoder.
    """
    from ordered_vqvae.prior import CodePrior, InverseSqrtSchedule

    train_codes = np.asarray(train_codes)
    if train_codes.ndim != 2 or train_codes.shape[1] != code_length:
        raise ValueError(f"training codes have shape {train_codes.shape}, expected "
                         f"[N, {code_length}]")
    if train_codes.size and (train_codes.min() < 0 or train_codes.max() >= codebook_size):
        raise ValueError(f"training codes span [{train_codes.min()}, {train_codes.max()}], "
                         f"expected [0, {codebook_size - 1}]")
    keras.utils.set_random_seed(config.seed)

    def make_optimizer():
        return keras.optimizers.AdamW(InverseSqrtSchedule(config.learning_rate, config.warmup_steps),
                                      weight_decay=config.weight_decay, beta_1=0.9, beta_2=0.98,
                                      clipnorm=1.0)

    def prepare(m, optimizer):
        m.compile(optimizer=optimizer)

    stage = Stage("prior", config.epochs, make_optimizer, prepare,
                  f"lr={config.learning_rate:g} (warm-up {config.warmup_steps} steps)")
    with (strategy or tf.distribute.get_strategy()).scope():
        model = CodePrior.from_config_for(config, code_length, codebook_size)
        data = TrainingData(train_codes.astype(np.int32), config.batch_size, config.seed,
                            steps_per_epoch)
        fit_stages(model, [stage], data, workdir, "train prior", resume=resume, verbose=verbose,
                   validation_data=val_codes, checkpoint_every=checkpoint_every)
    return model
