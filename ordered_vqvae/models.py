"""Ordered autoencoders: continuous (recovers PCA when linear) and the ordered VQ-VAE.

Both share one training step: encode to K tokens, (quantize,) keep a prefix of k tokens
drawn by `NestedTruncation`, decode, and minimise the reconstruction error averaged over
prefixes (Xu et al., ICLR 2021, Eq. for the ordered autoencoder).
"""

from __future__ import annotations

from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from ordered_vqvae import artifacts
from ordered_vqvae.configs import DISTRIBUTIONS, AutoencoderConfig
from ordered_vqvae.normalization import BatchNormalization
from ordered_vqvae.quantizer import VectorQuantizer
from ordered_vqvae.replicas import loggable, replica_share
from ordered_vqvae.truncation import NestedTruncation
from ordered_vqvae.validation import (check_choice, check_codes, check_image_tensor,
                                      check_num_codes, finite_loss)


class _Ordered(keras.Model):
    """Shared nested-truncation training of an encoder -> tokens -> decoder model.

    Subclasses define `_tokens` (images -> tokens [N, K, D] plus quantizer outputs) and
    `_untokens` (tokens -> decoder input), and the scale the reconstruction loss uses.
    """

    def __init__(self, encoder, decoder, truncation: NestedTruncation, prefix_chunk: int = 16,
                 **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder
        self.truncation = truncation
        self.prefix_chunk = int(prefix_chunk)
        self.trained_truncation = None  # The objective `fit` trains: see `compile`.
        self.trackers = {name: keras.metrics.Mean(name=name) for name in
                         ("loss", "recon", "perplexity", "usage", "restarted")}

    def compile(self, optimizer="adam", truncation: Optional[str] = None, **kwargs):
        """Keras's compile, plus the truncation distribution that `fit` trains with
        (default: the truncation layer's own). A training stage passes its own (the
        reference recipe pretrains with "none"); the layer, and so the saved model's
        config, keeps the configured one."""
        if truncation is not None:
            check_choice("truncation", truncation, DISTRIBUTIONS)
        self.trained_truncation = truncation
        super().compile(optimizer=optimizer, **kwargs)

    @property
    def code_length(self) -> int:
        return self.truncation.code_length

    # Hooks for subclasses.
    def _preprocess(self, x):
        return x

    def _postprocess(self, y):
        return y

    def _tokens(self, x, mask, training):
        raise NotImplementedError

    def _untokens(self, tokens):
        raise NotImplementedError

    def _check_inputs(self, x):
        return tf.convert_to_tensor(x, tf.float32)

    def _decode_tokens(self, tokens, training=False):
        # float32 whatever the decoder computes in (see OrderedVQVAE on mixed precision).
        return tf.cast(self.decoder(self._untokens(tokens), training=training), tf.float32)

    def _per_example_error(self, target, recon):
        axes = list(range(1, len(target.shape)))
        return tf.reduce_mean(tf.square(target - recon), axis=axes)

    def _nested_loss(self, x, training, lengths=None):
        """Returns (total loss, reconstruction loss, quantizer outputs or {}).

        `lengths` int32 [N]: the training code lengths (drawn here when not given)."""
        target = self._preprocess(x)
        batch = tf.shape(x)[0]
        trunc = self.truncation
        distribution = self.trained_truncation or trunc.distribution
        if training and distribution == "all":
            keep = tf.constant(trunc.keep_probabilities(distribution), tf.float32)
            tokens, aux = self._tokens(target, tf.tile(keep[None], [batch, 1]), training)
            ks = trunc.prefix_lengths()
            # Uniform over ks, plus any full-code share.
            weight = trunc.length_probabilities(distribution)
            total = 0.0
            for start in range(0, len(ks), self.prefix_chunk):
                chunk = ks[start:start + self.prefix_chunk]
                lengths = tf.repeat(tf.constant(chunk, tf.int32), batch)
                reps = [len(chunk)] + [1] * (len(tokens.shape) - 1)
                cut, _ = trunc.apply(tf.tile(tokens, reps), lengths)
                recon = self._decode_tokens(cut, training=training)
                rep_target = tf.tile(target, [len(chunk)] + [1] * (len(target.shape) - 1))
                error = tf.reshape(self._per_example_error(rep_target, recon), [len(chunk), -1])
                chunk_weight = tf.constant([weight[k - 1] for k in chunk], tf.float32)
                total += tf.reduce_sum(chunk_weight[:, None] * error)
            recon_loss = total / tf.cast(batch, tf.float32)
        else:
            if not training:
                lengths = tf.fill([batch], self.code_length)
            elif lengths is None:
                lengths = trunc.sample_lengths(batch, distribution=distribution)
            tokens, aux = self._tokens(target, trunc.keep_mask(lengths), training)
            cut, _ = trunc.apply(tokens, lengths)
            recon = self._decode_tokens(cut, training=training)
            recon_loss = tf.reduce_mean(self._per_example_error(target, recon))
        loss = recon_loss + (aux["loss"] if aux else 0.0)
        return loss, recon_loss, aux

    def _update_metrics(self, x, loss, recon, aux):
        """Running means over the epoch, weighted by batch size (Keras may run a last, empty
        batch: weight 0); the quantizer's statistics where there is one."""
        values = {"loss": loss, "recon": recon, **{k: aux[k] for k in self.trackers if k in aux}}
        n = tf.shape(x)[0]
        for name, value in values.items():
            self.trackers[name].update_state(tf.where(n > 0, value, 0.0),
                                             sample_weight=tf.cast(n, tf.float32))
        return loggable({name: self.trackers[name].result() for name in values})

    @property
    def metrics(self):
        return list(self.trackers.values())

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras's build from a peeked multi-worker batch fails (test_distributed shows it);
        # training builds the model and optimizer before `fit`, leaving nothing to build.
        if self.built and self.optimizer is not None and self.optimizer.built:
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def train_step(self, data):
        """`data`: images, or {"image": images, "lengths": int32 [N]} with the code lengths
        drawn by the training stream (`training.autoencoder_stream`)."""
        lengths = data.get("lengths") if isinstance(data, dict) else None
        x = self._check_inputs(data["image"] if isinstance(data, dict) else data)
        with tf.GradientTape() as tape:
            loss, recon, aux = self._nested_loss(x, training=True, lengths=lengths)
            # No update from a non-finite step.
            loss = finite_loss(loss, self.optimizer.iterations)
            share = replica_share(loss)
        variables = self.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(share, variables), variables))
        return self._update_metrics(x, loss, recon, aux)

    def test_step(self, data):
        x = self._check_inputs(data["image"] if isinstance(data, dict) else data)
        loss, recon, aux = self._nested_loss(x, training=False)
        return self._update_metrics(x, loss, recon, aux)

    def reconstruct(self, x, num_codes: Optional[int] = None):
        """Reconstructions from the first `num_codes` tokens (all K by default)."""
        x = self._check_inputs(x)
        tokens, _ = self._tokens(self._preprocess(x), None, False)
        cut, _ = self.truncation(tokens, num_codes=self.code_length if num_codes is None
                                 else num_codes)
        return self._postprocess(self._decode_tokens(cut))

    def call(self, x, training=False):
        return self.reconstruct(x)


@keras.saving.register_keras_serializable(package="ordered_vqvae")
class OrderedAutoencoder(_Ordered):
    """Continuous ordered autoencoder: encoder -> K scalars -> prefix -> decoder.

    With linear maps and the `all` objective its decoder directions are the principal
    components in order of variance.
    """

    def __init__(self, input_dim: int, code_length: int, linear: bool = True,
                 hidden_units: int = 64, truncation: str = "all", min_codes: int = 1,
                 seed: int = 0, **kwargs):
        self.input_dim, self.linear, self.hidden_units = int(input_dim), bool(linear), hidden_units
        init = keras.initializers.GlorotUniform(seed=seed)
        if linear:
            encoder = keras.Sequential([keras.Input((input_dim,)),
                                        keras.layers.Dense(code_length, use_bias=False,
                                                           kernel_initializer=init)], name="encoder")
            decoder = keras.Sequential([keras.Input((code_length,)),
                                        keras.layers.Dense(input_dim, use_bias=False,
                                                           kernel_initializer=init)], name="decoder")
        else:
            encoder = keras.Sequential([keras.Input((input_dim,)),
                                        keras.layers.Dense(hidden_units, "relu", kernel_initializer=init),
                                        keras.layers.Dense(code_length, kernel_initializer=init)],
                                       name="encoder")
            decoder = keras.Sequential([keras.Input((code_length,)),
                                        keras.layers.Dense(hidden_units, "relu", kernel_initializer=init),
                                        keras.layers.Dense(input_dim, kernel_initializer=init)],
                                       name="decoder")
        truncation_layer = NestedTruncation(code_length, distribution=truncation,
                                            min_codes=min_codes, seed=seed, name="truncation")
        truncation_layer.build((None, code_length, 1))
        super().__init__(encoder, decoder, truncation_layer, prefix_chunk=code_length, **kwargs)
        self._seed = seed

    def _tokens(self, x, mask, training):
        return self.encoder(x, training=training)[:, :, None], {}

    def _untokens(self, tokens):
        return tokens[:, :, 0]

    def encode(self, x):
        """Continuous codes float32 [N, K]."""
        return self.encoder(self._check_inputs(x))

    def decode(self, codes, num_codes: Optional[int] = None):
        """Continuous codes [N, K] -> reconstructions from the first `num_codes` (K)."""
        cut, _ = self.truncation(tf.convert_to_tensor(codes, tf.float32)[:, :, None],
                                 num_codes=self.code_length if num_codes is None else num_codes)
        return self._decode_tokens(cut)

    def decoder_directions(self) -> np.ndarray:
        """[K, input_dim] rows of the linear decoder (linear models only)."""
        if not self.linear:
            raise ValueError("decoder_directions needs linear=True")
        return keras.ops.convert_to_numpy(self.decoder.layers[-1].kernel)

    def get_config(self):
        return {"input_dim": self.input_dim, "code_length": self.code_length,
                "linear": self.linear, "hidden_units": self.hidden_units,
                "truncation": self.truncation.distribution,
                "min_codes": self.truncation.min_codes, "seed": self._seed,
                "name": self.name}


def build_encoder(config: AutoencoderConfig) -> keras.Model:
    """Images in [-1,1] [N,H,W,C] -> latent [N, H/2^L, W/2^L, latent_channels]."""
    if config.architecture == "residual":
        return _residual_encoder(config)
    init = keras.initializers.GlorotUniform(seed=config.seed)
    layers = [keras.Input(config.image_shape)]
    for width in config.hidden:
        layers += [keras.layers.Conv2D(width, 4, 2, "same", use_bias=False, kernel_initializer=init),
                   BatchNormalization(), keras.layers.ReLU()]
    layers.append(keras.layers.Conv2D(config.latent_channels, 3, 1, "same", kernel_initializer=init))
    return keras.Sequential(layers, name="encoder")


def build_decoder(config: AutoencoderConfig) -> keras.Model:
    """Latent [N, h, w, latent_channels] -> images in [-1,1] [N,H,W,C] (tanh)."""
    if config.architecture == "residual":
        return _residual_decoder(config)
    init = keras.initializers.GlorotUniform(seed=config.seed + 1)
    h, w = config.latent_hw
    layers = [keras.Input((h, w, config.latent_channels)),
              keras.layers.Conv2D(config.hidden[-1], 3, 1, "same", use_bias=False,
                                  kernel_initializer=init),
              BatchNormalization(), keras.layers.ReLU()]
    for width in reversed(config.hidden[:-1]):
        layers += [keras.layers.Conv2DTranspose(width, 4, 2, "same", use_bias=False,
                                                kernel_initializer=init),
                   BatchNormalization(), keras.layers.ReLU()]
    layers += [keras.layers.Conv2DTranspose(config.image_shape[-1], 4, 2, "same",
                                            kernel_initializer=init),
               keras.layers.Activation("tanh")]
    return keras.Sequential(layers, name="decoder")


def _residual_blocks(x, config: AutoencoderConfig, init, prefix: str):
    """`config.residual_blocks` blocks x + conv1x1(relu(conv3x3(relu(x)))) at x's width, the
    inner convolution half as wide (the VQ-VAE paper's block), then a ReLU."""
    width = x.shape[-1]
    for i in range(config.residual_blocks):
        y = keras.layers.ReLU()(x)
        y = keras.layers.Conv2D(max(width // 2, 1), 3, 1, "same", kernel_initializer=init,
                                name=f"{prefix}_block{i}_conv3x3")(y)
        y = keras.layers.ReLU()(y)
        y = keras.layers.Conv2D(width, 1, kernel_initializer=init,
                                name=f"{prefix}_block{i}_conv1x1")(y)
        x = keras.layers.Add()([x, y])
    return keras.layers.ReLU()(x)


def _residual_encoder(config: AutoencoderConfig) -> keras.Model:
    init = keras.initializers.HeUniform(seed=config.seed)
    inputs = keras.Input(config.image_shape)
    x = inputs
    for i, width in enumerate(config.hidden):
        x = keras.layers.Conv2D(width, 4, 2, "same", kernel_initializer=init,
                                name=f"down{i}")(x)
        if i < len(config.hidden) - 1:
            x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(config.hidden[-1], 3, 1, "same", kernel_initializer=init,
                            name="latent_in")(keras.layers.ReLU()(x))
    x = _residual_blocks(x, config, init, "encoder")
    latent = keras.layers.Conv2D(config.latent_channels, 1, kernel_initializer=init,
                                 name="to_latent")(x)
    return keras.Model(inputs, latent, name="encoder")


def _residual_decoder(config: AutoencoderConfig) -> keras.Model:
    init = keras.initializers.HeUniform(seed=config.seed + 1)
    h, w = config.latent_hw
    inputs = keras.Input((h, w, config.latent_channels))
    x = keras.layers.Conv2D(config.hidden[-1], 3, 1, "same", kernel_initializer=init,
                            name="from_latent")(inputs)
    x = _residual_blocks(x, config, init, "decoder")
    for i, width in enumerate(reversed(config.hidden[:-1])):
        x = keras.layers.Conv2DTranspose(width, 4, 2, "same", kernel_initializer=init,
                                         name=f"up{i}")(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2DTranspose(config.image_shape[-1], 4, 2, "same",
                                     kernel_initializer=keras.initializers.GlorotUniform(
                                         seed=config.seed + 1), name="to_image")(x)
    return keras.Model(inputs, keras.layers.Activation("tanh")(x), name="decoder")


@keras.saving.register_keras_serializable(package="ordered_vqvae")
class OrderedVQVAE(_Ordered):
    """Encoder -> vector quantizer -> nested truncation -> decoder.

    Images are float32 [N,H,W,C] in [0,1]; codes are int32 [N,K]. Internally images are
    scaled to [-1,1] (the decoder ends in tanh) and the training reconstruction term is
    the MSE on that scale, as in the reference; reported MSEs are on the [0,1] scale.

    Mixed precision: with `compute_dtype="bfloat16"` (or built under the global policy
    "mixed_bfloat16"), the encoder and decoder compute in bfloat16 (their weights stay
    float32) while the quantizer, the truncation, the losses and every input and output
    stay float32.
    """

    def __init__(self, config: AutoencoderConfig, **kwargs):
        if isinstance(config, dict):
            config = AutoencoderConfig.from_dict(config)
        self.config = config
        truncation = NestedTruncation(config.code_length, distribution=config.truncation,
                                      min_codes=config.min_codes, geometric_p=config.geometric_p,
                                      fill=config.fill, seed=config.seed,
                                      full_code_share=config.full_code_share,
                                      length_power=config.length_power, dtype="float32",
                                      name="truncation")
        kwargs.setdefault("dtype", "float32")
        policy = keras.mixed_precision.global_policy()
        if config.compute_dtype == "bfloat16":
            keras.mixed_precision.set_global_policy("mixed_bfloat16")  # Read by each layer.
        try:
            encoder, decoder = build_encoder(config), build_decoder(config)
        finally:
            keras.mixed_precision.set_global_policy(policy)
        super().__init__(encoder, decoder, truncation, prefix_chunk=config.prefix_chunk,
                         **kwargs)
        self.quantizer = VectorQuantizer(config.codebook_size, config.embedding_dim,
                                         beta=config.beta, use_ema=config.use_ema,
                                         ema_decay=config.ema_decay,
                                         dead_code_steps=config.dead_code_steps,
                                         seed=config.seed, dtype="float32", name="quantizer")
        h, w = config.latent_hw
        self.quantizer.build((None, config.code_length, config.embedding_dim))
        self.truncation.build((None, config.code_length, config.embedding_dim))
        self._latent_shape = (h, w, config.latent_channels)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def image_shape(self):
        return tuple(self.config.image_shape)

    def _preprocess(self, x):
        return x * 2.0 - 1.0

    def _postprocess(self, y):
        return tf.clip_by_value((y + 1.0) * 0.5, 0.0, 1.0)

    def _check_inputs(self, x):
        return check_image_tensor(x, self.image_shape)

    def _to_tokens(self, z):
        """Latent [N,h,w,C] -> tokens [N,K,D] (channel-wise: K=C, D=h*w)."""
        h, w, c = self._latent_shape
        if self.config.quantization == "channel":
            return tf.transpose(tf.reshape(z, [-1, h * w, c]), [0, 2, 1])
        return tf.reshape(z, [-1, h * w, c])

    def _untokens(self, tokens):
        h, w, c = self._latent_shape
        if self.config.quantization == "channel":
            tokens = tf.transpose(tokens, [0, 2, 1])
        return tf.reshape(tokens, [-1, h, w, c])

    def _latent(self, x, training):
        return tf.cast(self.encoder(x, training=training), tf.float32)

    def _tokens(self, x, mask, training):
        tokens = self._to_tokens(self._latent(x, training))
        out = self.quantizer(tokens, loss_mask=mask, training=training)
        return out["quantized"], out

    def encode(self, images):
        """images float32 [N,H,W,C] in [0,1] -> codes int32 [N,K]."""
        x = self._preprocess(self._check_inputs(images))
        tokens = self._to_tokens(self._latent(x, False))
        return self.quantizer(tokens, training=False)["indices"]

    def decode(self, codes, num_codes=None):
        """codes int [N,K] -> images float32 [N,H,W,C] in [0,1] from the first `num_codes` (k:
        an int, an int32 scalar tensor or int32 [N], one k per row; K by default). Codes at
        positions >= k are ignored, whatever they hold, exactly as truncation ignores them
        in training."""
        K = self.code_length
        num_codes = check_num_codes(K if num_codes is None else num_codes, K)
        codes = check_codes(tf.convert_to_tensor(codes), K, self.codebook_size, num_codes)
        lengths = tf.broadcast_to(num_codes, tf.shape(codes)[:1])
        codes = tf.where(tf.range(K)[None, :] < lengths[:, None], codes, 0)
        cut, _ = self.truncation.apply(self.quantizer.lookup(codes), lengths)
        return self._postprocess(self._decode_tokens(cut))

    def mse_by_length(self, images, lengths, batch_size: int = 500) -> dict:
        """Mean squared error on the [0,1] scale of reconstructions from k codes, per k, over
        images [N,H,W,C] or an iterable of such batches (a stream of any length)."""
        batches = images
        if hasattr(images, "shape"):
            batches = (images[s:s + batch_size] for s in range(0, len(images), batch_size))
        totals = {k: 0.0 for k in lengths}
        n = 0
        for batch in batches:
            x = tf.convert_to_tensor(batch, tf.float32)
            codes = self.encode(x)
            for k in lengths:
                err = tf.reduce_sum(tf.reduce_mean(tf.square(self.decode(codes, k) - x), [1, 2, 3]))
                totals[k] += float(err)
            n += len(x)
        return {k: v / n for k, v in totals.items()}

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


AUTOENCODER_CONFIG = "autoencoder.json"
AUTOENCODER_WEIGHTS = "autoencoder.weights.h5"


def save_autoencoder(model: OrderedVQVAE, directory: str) -> str:
    return artifacts.save_model_dir(model, model.config.to_dict(), directory,
                                    AUTOENCODER_CONFIG, AUTOENCODER_WEIGHTS)


def load_autoencoder(directory: str) -> OrderedVQVAE:
    """Reads a model written by `save_autoencoder` (by this or an earlier version)."""
    def build(config: dict) -> OrderedVQVAE:
        model = OrderedVQVAE(AutoencoderConfig.from_dict(config))
        model(tf.zeros((1,) + tuple(model.image_shape)))
        return model

    return artifacts.load_model_dir(directory, AUTOENCODER_CONFIG, AUTOENCODER_WEIGHTS, build,
                                    "autoencoder", "ovqvae train_autoencoder --force")
