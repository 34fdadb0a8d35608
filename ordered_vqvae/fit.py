"""The fit engine: Keras `fit` with exact checkpoint/resume, a seeded training stream, a NaN
guard and a history file, for any model and any list of optimizer stages.

Both training recipes (`ordered_vqvae.training`) run through `fit_stages`. The stream
(`TrainingData`) makes every global batch a pure function of (seed, epoch, step), so a run
killed and resumed mid-epoch, or run on several replicas or workers, sees exactly the
batches of an uninterrupted single-device run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from typing import Callable, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from ordered_vqvae.atomic import atomic_file, write_json
from ordered_vqvae.examples import ExampleFile
from ordered_vqvae.validation import failed_step

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
    """Training examples [N, ...] and how they are batched, as a pure function of (seed,
    epoch): each epoch is a fresh permutation drawn from that pair, so a run resumed
    mid-epoch and a distributed run see exactly the global batches of an uninterrupted
    single-device run.

    `examples` is an array in memory, or an `ExampleFile` (`ordered_vqvae.examples`) whose
    rows each batch reads from disk: then memory holds a few batches and the permutation's
    indices (8 bytes per example), whatever N.

    `side(step, batch_size)`, when given, returns per-example extras for one global batch
    (the autoencoder's code lengths); elements are then {"image": batch, **extras}. Extras
    are drawn for the whole global batch before it is split between workers and replicas.
    `transform`, when given, maps each (per-replica) element to what the model's
    `train_step` takes (the prior's (inputs, labels) pairs).
    """

    examples: Union[np.ndarray, ExampleFile]
    batch_size: int
    seed: int = 0
    steps_per_epoch: Optional[int] = None
    side: Optional[Callable] = None
    transform: Optional[Callable] = None

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
        seed = tf.constant(self.seed, tf.int64)
        if isinstance(self.examples, ExampleFile):
            source = self.examples
            row_shape, dtype = source.shape[1:], tf.as_dtype(source.dtype)

            def gather(index):
                rows = tf.numpy_function(source.read, [index], dtype)
                return tf.ensure_shape(rows, (None,) + row_shape)
        else:
            examples = tf.constant(self.examples)

            def gather(index):
                return tf.gather(examples, index)

        def epoch(e):
            perm = tf.argsort(tf.random.stateless_uniform([n], tf.stack([seed, e])))
            steps = e * spe + tf.range(spe, dtype=tf.int64)
            return tf.data.Dataset.from_tensor_slices((steps, tf.reshape(perm[:spe * gb], [spe, gb])))

        lo, hi = shard * gb // num_shards, (shard + 1) * gb // num_shards

        def element(step, index):
            batch = gather(index[lo:hi])
            if self.side is None:
                return batch
            extras = self.side(tf.stack([seed, step]), gb)
            return {"image": batch, **{k: v[lo:hi] for k, v in extras.items()}}

        ds = tf.data.Dataset.range(first_epoch, end_epoch).flat_map(epoch).skip(skip).map(element)
        if per_replica and per_replica < hi - lo:
            ds = ds.unbatch().batch(per_replica, drop_remainder=True)
        if self.transform is not None:
            ds = ds.map(self.transform)
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


MAX_STEPS_PER_EXECUTION = 16


def steps_per_execution(*counts: int) -> int:
    """The training steps Keras runs per compiled call (`compile(steps_per_execution=)`):
    the largest n <= MAX_STEPS_PER_EXECUTION dividing every nonzero count (the steps per
    epoch, a resume's skipped batches, the checkpoint interval), so that a call never
    crosses an epoch's end or a checkpoint. (`fit_stages` runs one step per call under a
    tf.distribute strategy.) Fewer calls cut the per-step overhead of the training loop
    (docs/performance.md)."""
    common = math.gcd(*counts)
    return max(n for n in range(1, MAX_STEPS_PER_EXECUTION + 1) if common % n == 0)


class _EpochLine(keras.callbacks.Callback):
    """One log line per epoch (verbose=2; Keras's own writes two: "Epoch n/N" and the
    metrics), after the other callbacks have added theirs to the logs."""

    def __init__(self, what: str, epochs: int):
        super().__init__()
        self.what, self.epochs, self.start = what, epochs, 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        values = ", ".join(f"{name} {value:.4g}" for name, value in (logs or {}).items())
        print(f"[{self.what}] epoch {epoch + 1}/{self.epochs}: {values} "
              f"({time.perf_counter() - self.start:.1f} s)", flush=True)


class _Position(keras.callbacks.Callback):
    """Tracks where training is (epoch, first batch of the running call, steps done), to
    say where it diverged; saves a checkpoint every `every` batches, and at every epoch end
    records the epoch's logs and saves one. Runs after the other callbacks, which may add
    logs. Keras calls the batch hooks once per compiled call of steps_per_execution steps,
    with that call's first and last batch."""

    def __init__(self, save: Callable[[int, int], None], record: Callable[[int, dict], None],
                 every: int, steps_per_epoch: int, first_batch: int = 0):
        super().__init__()
        self.save, self.record, self.every, self.first_batch = save, record, every, first_batch
        self.steps_per_epoch = steps_per_epoch  # An epoch stopped short of it is partial.
        self.epoch = self.batch = self.done = self.end = 0

    def on_train_begin(self, logs=None):
        self.done = int(self.model.optimizer.iterations.numpy())

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.batch = self.first_batch + batch

    def on_train_batch_end(self, batch, logs=None):
        end = self.first_batch + batch + 1  # Batches of this epoch done.
        self.done += end - self.batch
        self.end = end
        if (self.every and end % self.every == 0) or self.model.stop_training:
            self.save(self.epoch, end)

    def batch_of(self, step: int) -> int:
        """The batch in the epoch of `step` (1-based) of the running call."""
        return self.batch + step - 1 - self.done

    def on_epoch_end(self, epoch, logs=None):
        if self.model.stop_training and self.end < self.steps_per_epoch:
            # Stopped between steps: the position saved at the last batch is where a
            # resumed run continues, and the epoch's logs cover the batches run.
            self.record(epoch, {**(logs or {}), "batches": self.end})
            return
        self.record(epoch, logs or {})
        self.save(epoch + 1, 0)
        self.first_batch = 0


class _KeepBest(keras.callbacks.Callback):
    """Keeps the weights of the epoch with the lowest `monitor` log: in memory and, on the
    chief, in `path` with the value and epoch, so that a resumed run knows them too. Runs
    before the epoch's checkpoint, so a kill between the two redoes an identical epoch."""

    def __init__(self, monitor: str, path: str, chief: bool):
        super().__init__()
        self.monitor, self.path, self.chief = monitor, path, chief
        self.best = None  # (value, epoch, weights)

    def load(self) -> None:
        if tf.io.gfile.exists(self.path):
            with tf.io.gfile.GFile(self.path, "rb") as f, np.load(f) as saved:
                self.best = (float(saved["value"]), int(saved["epoch"]),
                             [saved[f"w{i}"] for i in range(int(saved["count"]))])

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not np.isfinite(value):
            return
        if self.best is None or value < self.best[0]:
            weights = self.model.get_weights()
            self.best = (float(value), epoch + 1, weights)
            if self.chief:
                tf.io.gfile.makedirs(os.path.dirname(self.path))
                with atomic_file(self.path, "wb") as f:
                    np.savez(f, value=value, epoch=epoch + 1, count=len(weights),
                             **{f"w{i}": w for i, w in enumerate(weights)})


class _Deadline(keras.callbacks.Callback):
    """Advances the stage's time progress after each compiled call and stops training
    (between steps) once the stage's deadline has passed. Progress restored from a
    checkpoint carries on: p = p0 + (1 - p0) * elapsed / (deadline - start); a stage that
    had spent a whole budget (p0 = 1) starts a new cycle from 0."""

    def __init__(self, progress: tf.Variable, deadline: float):
        super().__init__()
        self.progress, self.deadline = progress, deadline
        self.start = time.time()
        p0 = float(progress.numpy())
        self.p0 = 0.0 if p0 >= 1.0 else p0
        progress.assign(self.p0)
        self.stopped = False

    def on_train_batch_end(self, batch, logs=None):
        span = max(self.deadline - self.start, 1e-6)
        elapsed = time.time() - self.start
        self.progress.assign(min(1.0, self.p0 + (1.0 - self.p0) * elapsed / span))
        if time.time() >= self.deadline:
            self.model.stop_training = self.stopped = True


@dataclasses.dataclass
class Stage:
    """A run of epochs with one fresh optimizer: epochs up to `end` (counted from the
    start of training); `make_optimizer(progress)` gets the stage's progress variable (see
    `fit_stages`) for a learning-rate schedule that follows it; `prepare(model, optimizer,
    steps_per_execution)` sets the model up and compiles it."""

    name: str
    end: int
    make_optimizer: Callable[[tf.Variable], keras.optimizers.Optimizer]
    prepare: Callable[[keras.Model, keras.optimizers.Optimizer, int], None]
    description: str = ""
    data: Optional["TrainingData"] = None  # This stage's stream (default: fit_stages's).


def _check_fresh_or_resume(workdir: str, resume: bool) -> None:
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not resume and tf.io.gfile.exists(ckpt_dir) and tf.train.latest_checkpoint(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; pass resume=True "
                              "to continue, or use a fresh workdir")


def is_chief(strategy) -> bool:
    """Whether this process writes checkpoints, logs and history (all but multi-worker
    non-chief workers)."""
    return bool(getattr(strategy.extended, "should_checkpoint", True))


def _seed_states(model: keras.Model) -> list:
    """The state of the model's random generators (dropout, truncation), which the model's
    own checkpoint leaves out; restoring them makes a resumed run draw the same masks."""
    return [v.value for v in model.non_trainable_variables
            if v.path.endswith("seed_generator_state")]


def fit_stages(model: keras.Model, stages: Sequence[Stage], data: TrainingData, workdir: str,
               what: str, resume: bool = False, verbose: int = 1, callbacks: Sequence = (),
               validation_data=None, checkpoint_every: int = 0,
               keep_best: Optional[str] = None, deadline: Optional[float] = None) -> list:
    """Runs `stages` with `model.fit` on `data`, checkpointing model, optimizer and position
    under `workdir/checkpoints` at every epoch end and every `checkpoint_every` batches (0:
    epoch ends only); with `resume` it continues from the latest checkpoint, mid-epoch
    included, on exactly the batches an uninterrupted run would have seen.

    Runs under the current tf.distribute strategy (build the model in its scope); only the
    chief writes to `workdir`. A NaN or Inf loss (models guard it with `finite_loss`) stops
    training with TrainingDiverged naming the step; the last good checkpoint stays. With
    `keep_best` (a log such as "val_bits_per_code") the model ends with the weights of the
    epoch where that log was lowest, not the last epoch's (best.npz beside the checkpoints
    keeps them across a resume). Returns the history (also in workdir/history.json); after
    a resume mid-epoch, that epoch's logged training means cover only the batches run since.

    `deadline` (a `time.time()` value) is a time budget: training stops between steps once
    it has passed, leaving a checkpoint at that step (a resumed run continues from it), and
    the last history entry says `budget_stop` (with `batches`, the steps of a partial
    epoch). Each stage gets the remaining time in proportion to its remaining epochs, and
    its `progress` variable (what `WarmupCosine` reads) follows the time it has used.
    """
    _check_fresh_or_resume(workdir, resume)
    run = _Run(model, data, workdir, what, resume, verbose, checkpoint_every, keep_best,
               total_epochs=stages[-1].end)
    first = 0
    try:
        for stage in stages:
            run.stage(stage, first, callbacks, validation_data, deadline)
            first = stage.end
            if run.budget_stop:
                break
        run.keep_best_weights()
    finally:
        run.close()
    return run.history


class _Run:
    """What the stages of one `fit_stages` call share: the strategy, the checkpoint
    position (epoch and batch variables), the history and the best epoch's weights."""

    def __init__(self, model, data, workdir, what, resume, verbose, checkpoint_every,
                 keep_best, total_epochs):
        self.model, self.data, self.workdir, self.what = model, data, workdir, what
        self.resume, self.verbose, self.total = resume, verbose, total_epochs
        self.checkpoint_every, self.keep_best = checkpoint_every, keep_best
        self.strategy = tf.distribute.get_strategy()
        self.chief = is_chief(self.strategy)
        self.ckpt_dir = os.path.join(workdir, "checkpoints")
        self.save_dir = self.ckpt_dir if self.chief else tempfile.mkdtemp(prefix="ovqvae-worker-")
        with self.strategy.scope():
            self.epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.batch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
            # The running stage's progress in [0, 1] by its time budget (see _Deadline).
            self.progress = tf.Variable(0.0, dtype=tf.float32, trainable=False)
        self.budget_stop = False
        self.history = []
        self.history_path = os.path.join(workdir, "history.json")
        if resume and tf.io.gfile.exists(self.history_path):
            with tf.io.gfile.GFile(self.history_path) as f:
                self.history = json.load(f)
        self.keep = None
        if keep_best:
            self.keep = _KeepBest(keep_best, os.path.join(self.save_dir, "best.npz"), self.chief)
            if resume:
                self.keep.load()

    def record(self, epoch, logs, stage: str) -> None:
        self.history.append({"epoch": epoch + 1, "stage": stage,
                             **{k: float(v) for k, v in logs.items()}})
        if self.chief:
            write_json(self.history_path, self.history)

    def _restore(self, stage, first: int):
        """(checkpoint, manager, optimizer) of a stage, restored from the latest checkpoint
        when resuming: weights always, the optimizer only when resuming inside this stage,
        since a new stage starts with a fresh optimizer, as an uninterrupted run does."""
        model = self.model
        with self.strategy.scope():
            optimizer = stage.make_optimizer(self.progress)
            optimizer.build(model.trainable_variables)
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=self.epoch_var,
                                         batch=self.batch_var, seeds=_seed_states(model),
                                         progress=self.progress)
        manager = tf.train.CheckpointManager(checkpoint, self.save_dir, max_to_keep=3)
        latest = tf.train.latest_checkpoint(self.ckpt_dir) if self.resume else None
        self.progress.assign(0.0)
        if latest:
            tf.train.Checkpoint(model=model, epoch=self.epoch_var, batch=self.batch_var,
                                seeds=_seed_states(model)).restore(latest).expect_partial()
            if (int(self.epoch_var.numpy()), int(self.batch_var.numpy())) > (first, 0):
                checkpoint.restore(latest).expect_partial()
        return checkpoint, manager, optimizer

    def stage(self, stage, first: int, callbacks, validation_data,
              deadline: Optional[float] = None) -> None:
        """Runs one stage (epochs first..stage.end), or what a resume leaves of it, until
        its share of the time to `deadline` (the whole run's) when given."""
        checkpoint, manager, optimizer = self._restore(stage, first)
        done, done_batches = int(self.epoch_var.numpy()), int(self.batch_var.numpy())
        # A kill between logging an epoch and checkpointing it leaves an extra entry.
        self.history[:] = [h for h in self.history if h["epoch"] <= done]
        if done >= stage.end:
            return
        data = stage.data or self.data
        spe = data.steps_per_epoch
        initial = max(first, done)
        if deadline is not None:  # This stage's epochs' share of the time left.
            now, left = time.time(), stage.end - initial
            deadline = now + (deadline - now) * left / (left + self.total - stage.end)
        skip = done_batches if initial == done else 0
        if self.verbose:
            at = f" (from batch {skip + 1} of {spe})" if skip else ""
            print(f"[{self.what}] stage '{stage.name}': epochs {initial + 1}..{stage.end} of "
                  f"{self.total}{at}{', ' + stage.description if stage.description else ''}",
                  flush=True)
        # Several steps per call under a tf.distribute strategy fail in Keras 3.15
        # ("You must feed a value for placeholder tensor" in its step loop).
        per_call = (1 if tf.distribute.has_strategy()
                    else steps_per_execution(spe, skip, self.checkpoint_every))
        stage.prepare(self.model, optimizer, per_call)

        def save(epoch, batch):
            self.epoch_var.assign(epoch)
            self.batch_var.assign(batch)
            manager.save(checkpoint_number=epoch * spe + batch)

        position = _Position(save, lambda e, logs: self.record(e, logs, stage.name),
                             self.checkpoint_every, spe, skip)
        clock = None
        if deadline is not None:
            clock = _Deadline(self.progress, deadline)
        else:  # Without a budget the steps alone set the schedule's progress.
            self.progress.assign(0.0)
        board = os.path.join(self.workdir if self.chief else self.save_dir, "tensorboard")
        all_callbacks = [*([clock] if clock else []), *callbacks,
                         keras.callbacks.TensorBoard(board, write_graph=False),
                         *([self.keep] if self.keep else []), position,
                         *([_EpochLine(self.what, self.total)] if self.verbose == 2 else [])]
        # A resume mid-epoch first finishes that epoch, then runs whole ones.
        runs = ([(initial, initial + 1, skip), (initial + 1, stage.end, 0)] if skip
                else [(initial, stage.end, 0)])
        for begin, end, skip_batches in runs:
            if begin < end:
                self._fit(data, begin, end, skip_batches, all_callbacks, validation_data,
                          position)
            if clock is not None and clock.stopped:
                self._stopped_on_budget(position)
                return

    def _stopped_on_budget(self, position) -> None:
        self.budget_stop = True
        if self.history:
            self.history[-1]["budget_stop"] = 1.0
            if self.chief:
                write_json(self.history_path, self.history)
        if self.verbose:
            print(f"[{self.what}] time budget spent: stopped at epoch {position.epoch + 1}, "
                  f"batch {position.end} of {position.steps_per_epoch}; the checkpoint there "
                  "resumes it", flush=True)

    def _fit(self, data, begin, end, skip_batches, callbacks, validation_data, position):
        try:
            self.model.fit(data.distributed(self.strategy, begin, end, skip_batches),
                           epochs=end, initial_epoch=begin, callbacks=callbacks,
                           verbose=1 if self.verbose == 1 else 0,
                           steps_per_epoch=data.steps_per_epoch - skip_batches,
                           shuffle=False, validation_data=validation_data)
        except tf.errors.InvalidArgumentError as e:
            step = failed_step(e)
            if step is None:
                raise
            raise TrainingDiverged(
                f"the training loss became NaN or Inf at step {step} (epoch "
                f"{position.epoch + 1}, batch {position.batch_of(step) + 1}); the last good "
                f"checkpoint is {tf.train.latest_checkpoint(self.ckpt_dir) or 'none'}"
            ) from None

    def keep_best_weights(self) -> None:
        if self.keep is not None and self.keep.best is not None:
            self.model.set_weights(self.keep.best[2])
            if self.verbose:
                print(f"[{self.what}] kept the weights of epoch {self.keep.best[1]}, where "
                      f"{self.keep_best} was lowest ({self.keep.best[0]:.4f})", flush=True)

    def close(self) -> None:
        if not self.chief:
            shutil.rmtree(self.save_dir, ignore_errors=True)
