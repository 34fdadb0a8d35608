"""The two training recipes: the ordered VQ-VAE and the code prior.

`train_autoencoder` runs the single-stage ordered recipe or the reference two-stage recipe
(pretrain with full codes, then ordered fine-tuning at a lower learning rate);
`train_prior` fits a CodePrior on code sequences. Both run through the fit engine
(`ordered_vqvae.fit`): Keras `fit` with a progress bar, TensorBoard scalars
(reconstruction MSE at 25/50/75/100% of K, codebook perplexity, bits per code),
checkpoints with exact resume, `tf.distribute`, and a NaN guard.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import keras
import numpy as np
import tensorflow as tf

from ordered_vqvae.configs import QUARTERS, AutoencoderConfig, fraction_label, fraction_lengths
from ordered_vqvae.examples import ExampleFile
from ordered_vqvae.fit import Stage, TrainingData, fit_stages
from ordered_vqvae.models import OrderedVQVAE
from ordered_vqvae.prior import CodePrior
from ordered_vqvae.schedules import InverseSqrtSchedule, WarmupCosine
from ordered_vqvae.validation import check_codes, check_images


def _check_file(examples: ExampleFile, shape: tuple, what: str, kind) -> None:
    """The shape and dtype of examples on disk (their values were checked when written)."""
    if examples.shape[1:] != shape or not np.issubdtype(examples.dtype, kind):
        raise ValueError(f"{what} in {examples.path!r} are {examples.dtype} of shape "
                         f"{examples.shape}, expected [N, {', '.join(map(str, shape))}] of "
                         f"{kind.__name__}")


class _CodeLengthMSE(keras.callbacks.Callback):
    """Adds validation MSE at 25/50/75/100% of K to the epoch logs (and so to TensorBoard):
    `val_mse_25pct` ... `val_mse_100pct`, every one even where two fractions share a k."""

    def __init__(self, images: np.ndarray):
        super().__init__()
        self.images = images

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self.images is None:
            return
        lengths = fraction_lengths(self.model.code_length, QUARTERS)
        mse = self.model.mse_by_length(self.images, sorted(set(lengths.values())))
        for fraction, k in lengths.items():
            logs[f"val_mse_{fraction_label(fraction)}"] = mse[k]


def _autoencoder_stages(config: AutoencoderConfig, stream: Callable[[str], TrainingData]):
    """The recipe's stages; `stream(truncation)` makes a stage's training stream."""
    def stage(name, end, truncation, lr):
        def prepare(model, optimizer, steps_per_execution):
            model.compile(optimizer=optimizer, truncation=truncation,
                          steps_per_execution=steps_per_execution)

        data = stream(truncation)
        epochs = end - (config.pretrain_epochs if end > config.pretrain_epochs else 0)

        def make_optimizer(progress):
            if config.lr_schedule == "constant":
                return keras.optimizers.Adam(lr)
            return keras.optimizers.Adam(WarmupCosine(lr, config.warmup_steps,
                                                      epochs * data.steps_per_epoch, progress))

        schedule = ("" if config.lr_schedule == "constant" else
                    f" ({config.lr_schedule}, warm-up {config.warmup_steps} steps)")
        return Stage(name, end, make_optimizer, prepare,
                     f"truncation={truncation}, lr={lr:g}{schedule}", data=data)

    if config.pretrain_epochs:
        return [stage("pretrain", config.pretrain_epochs, "none", config.learning_rate),
                stage("ordered finetune", config.pretrain_epochs + config.epochs,
                      config.truncation, config.finetune_learning_rate)]
    name = "ordered" if config.truncation != "none" else "unordered"
    return [stage(name, config.epochs, config.truncation, config.learning_rate)]


def autoencoder_stream(model: OrderedVQVAE, images: np.ndarray,
                       steps_per_epoch: Optional[int] = None,
                       truncation: Optional[str] = None) -> TrainingData:
    """The autoencoder's training stream: image batches with the code lengths that the
    model's truncation layer draws for them from `truncation` (default: its own)."""
    config = model.config
    return TrainingData(images, config.batch_size, config.seed, steps_per_epoch,
                        side=lambda seed, n: {"lengths": model.truncation.sample_lengths(
                            n, seed=tf.cast(seed, tf.int32), distribution=truncation)})


def train_autoencoder(config: AutoencoderConfig, train_images: Union[np.ndarray, ExampleFile],
                      val_images: Optional[np.ndarray], workdir: str, resume: bool = False,
                      verbose: int = 1, steps_per_epoch: Optional[int] = None,
                      checkpoint_every: int = 0, strategy=None,
                      deadline: Optional[float] = None) -> OrderedVQVAE:
    """Trains an ordered VQ-VAE on images [N,H,W,C] in [0,1], in memory or in an
    `ExampleFile` read a batch at a time; checkpoints under workdir.

    Args:
      resume: continue from the latest checkpoint in `workdir/checkpoints` (model,
        optimizer and epoch); without it an existing checkpoint directory is an error.
      steps_per_epoch: cap the steps of each epoch (for short runs and tests).
      checkpoint_every: also checkpoint every this many batches (0: at epoch ends only).
      strategy: a tf.distribute strategy to train under (default: the current one);
        `config.batch_size` is the global batch, split between replicas.
      deadline: a `time.time()` at which training stops between steps (a time budget;
        `fit.fit_stages`); the model is then the one at that step, checkpointed.

    Returns:
      The trained model. `workdir/history.json` holds the per-epoch logs.
    """
    if isinstance(train_images, ExampleFile):
        _check_file(train_images, tuple(config.image_shape), "training images", np.floating)
    else:
        check_images(train_images, config.image_shape, "training images")
    if val_images is not None:
        check_images(val_images, config.image_shape, "validation images")
    keras.utils.set_random_seed(config.seed)
    with (strategy or tf.distribute.get_strategy()).scope():
        model = OrderedVQVAE(config)
        model(tf.zeros((1,) + tuple(config.image_shape)))
        stages = _autoencoder_stages(config, lambda truncation: autoencoder_stream(
            model, train_images, steps_per_epoch, truncation))
        fit_stages(model, stages, stages[0].data, workdir, "train autoencoder",
                   resume=resume, verbose=verbose, callbacks=[_CodeLengthMSE(val_images)],
                   checkpoint_every=checkpoint_every, deadline=deadline)
    return model


def train_prior(config, code_length: int, codebook_size: int,
                train_codes: Union[np.ndarray, ExampleFile],
                val_codes: Optional[tf.data.Dataset], workdir: str, resume: bool = False,
                verbose: int = 1, steps_per_epoch: Optional[int] = None,
                checkpoint_every: int = 0, strategy=None, deadline: Optional[float] = None):
    """Trains a CodePrior (a `prior.PriorConfig`) on codes int32 [N, K], in memory or in an
    `ExampleFile`.

    AdamW (0.9, 0.98) with an inverse-square-root warm-up, as in the reference; validation
    negative log-likelihood (batches of codes) is logged as `val_bits_per_code`, and with
    validation codes the model ends with the weights of its best validation epoch.
    Checkpoints, `resume`, `checkpoint_every`, `strategy` and `deadline` as for the
    autoencoder.
    """
    if isinstance(train_codes, ExampleFile):
        _check_file(train_codes, (code_length,), "training codes", np.integer)
    else:
        train_codes = check_codes(train_codes, code_length, codebook_size,
                                  what="training codes")
    keras.utils.set_random_seed(config.seed)

    def make_optimizer(progress):
        return keras.optimizers.AdamW(InverseSqrtSchedule(config.learning_rate, config.warmup_steps),
                                      weight_decay=config.weight_decay, beta_1=0.9, beta_2=0.98,
                                      clipnorm=1.0)

    def prepare(m, optimizer, steps_per_execution):
        m.compile(optimizer=optimizer, steps_per_execution=steps_per_execution)

    stage = Stage("prior", config.epochs, make_optimizer, prepare,
                  f"lr={config.learning_rate:g} (warm-up {config.warmup_steps} steps)")
    with (strategy or tf.distribute.get_strategy()).scope():
        model = CodePrior.from_config_for(config, code_length, codebook_size)
        data = TrainingData(train_codes, config.batch_size, config.seed, steps_per_epoch,
                            transform=model.next_code_pairs)
        if val_codes is not None:
            val_codes = val_codes.map(model.next_code_pairs)
        fit_stages(model, [stage], data, workdir, "train prior", resume=resume, verbose=verbose,
                   validation_data=val_codes, checkpoint_every=checkpoint_every,
                   keep_best="val_bits_per_code" if val_codes is not None else None,
                   deadline=deadline)
    return model
