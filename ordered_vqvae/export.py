"""One SavedModel with `encode`, `decode` and `sample` signatures.

Loadable with plain `tf.saved_model.load(path)` in a process that never imports this
project. The contract (names and dtypes exactly):

  encode(images: float32 [N,H,W,C] in [0,1]) -> {"codes": int32 [N,K]}
  decode(codes: int32 [N,K], num_codes: int32 scalar) -> {"images": float32 [N,H,W,C]}
      codes beyond num_codes are ignored, exactly as in training's truncation
  sample(num_samples: int32, num_codes: int32, seed: int32, temperature: float32)
      -> {"images": float32 [N,H,W,C] in [0,1], "codes": int32 [N,K]}
      the XLA anytime sampler; codes beyond num_codes are FILL_CODE (0)

and attributes `code_length`, `codebook_size` and `image_shape` (int32 variables).
Out-of-range arguments fail inside the signature with a message naming the value.
"""

from __future__ import annotations

import glob
import os

import tensorflow as tf

from ordered_vqvae.atomic import atomic_directory
from ordered_vqvae.generator import ImageGenerator
from ordered_vqvae.validation import check_num_codes

SIGNATURES = ("encode", "decode", "sample")


class AnytimeModel(tf.Module):
    """The exported module: an OrderedVQVAE and its CodePrior, through their public APIs."""

    def __init__(self, autoencoder, prior):
        super().__init__(name="ordered_vqvae")
        self.autoencoder = autoencoder
        self.prior = prior
        self.generator = ImageGenerator(prior, autoencoder, jit_compile=True)
        K = autoencoder.code_length
        h, w, c = autoencoder.image_shape
        self.code_length = tf.Variable(K, dtype=tf.int32, trainable=False, name="code_length")
        self.codebook_size = tf.Variable(autoencoder.codebook_size, dtype=tf.int32,
                                         trainable=False, name="codebook_size")
        self.image_shape = tf.Variable([h, w, c], dtype=tf.int32, trainable=False,
                                       name="image_shape")
        self._K = K

        self.encode = tf.function(self._encode, input_signature=[
            tf.TensorSpec([None, h, w, c], tf.float32, name="images")])
        self.decode = tf.function(self._decode, input_signature=[
            tf.TensorSpec([None, K], tf.int32, name="codes"),
            tf.TensorSpec([], tf.int32, name="num_codes")])
        self.sample = tf.function(self._sample, input_signature=[
            tf.TensorSpec([], tf.int32, name="num_samples"),
            tf.TensorSpec([], tf.int32, name="num_codes"),
            tf.TensorSpec([], tf.int32, name="seed"),
            tf.TensorSpec([], tf.float32, name="temperature")])

    def _encode(self, images):
        return {"codes": self.autoencoder.encode(images)}

    def _decode(self, codes, num_codes):
        return {"images": self.autoencoder.decode(codes, num_codes)}

    def _sample(self, num_samples, num_codes, seed, temperature):
        checks = [
            tf.debugging.Assert(temperature > 0.0, ["temperature=", temperature,
                                                    "must be > 0"]),
            tf.debugging.Assert(num_samples >= 1, ["num_samples=", num_samples, "must be >= 1"]),
        ]
        num_codes = check_num_codes(num_codes, self._K)
        with tf.control_dependencies(checks):
            prefix = tf.zeros([num_samples, self._K], tf.int32)
        sampler = self.generator.sampler
        settings = {f.name: tf.constant(f.default, f.dtype) for f in sampler.filters}
        settings["temperature"] = temperature
        codes, finite = sampler.generate(prefix, tf.constant(0), num_codes, seed, settings)
        with tf.control_dependencies([tf.debugging.Assert(finite, ["the prior produced NaN or "
                                                                   "Inf logits"])]):
            images = self.autoencoder.decode(codes, num_codes)
        return {"images": images, "codes": codes}


def export(autoencoder, prior, path: str) -> str:
    """Writes the SavedModel to `path` atomically (temp dir beside it, then rename)."""
    module = AnytimeModel(autoencoder, prior)
    signatures = {name: getattr(module, name).get_concrete_function() for name in SIGNATURES}
    with atomic_directory(path) as tmp:
        tf.saved_model.save(module, tmp, signatures=signatures)
    return path


REQUIRED_FILES = ("saved_model.pb", os.path.join("variables", "variables.index"))


def check_saved_model_dir(path: str) -> None:
    """Raises FileNotFoundError naming what a SavedModel directory lacks."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"SavedModel directory {path!r} does not exist")
    shards = glob.glob(os.path.join(path, "variables", "variables.data-*-of-*"))
    count = int(shards[0].rsplit("-of-", 1)[1]) if shards else 1  # Every shard, or the first.
    data = [os.path.join("variables", f"variables.data-{i:05d}-of-{count:05d}")
            for i in range(count)]
    missing = [f for f in (*REQUIRED_FILES, *data) if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"SavedModel directory {path!r} is missing {', '.join(missing)}")
