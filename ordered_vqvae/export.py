"""One SavedModel with `encode`, `decode` and `sample` signatures.

Loadable with plain `tf.saved_model.load(path)` in a process that never imports this
project. The contract (names and dtypes exactly):

  encode(images: float32 [N,H,W,C] in [0,1]) -> {"codes": int32 [N,K]}
  decode(codes: int32 [N,K], num_codes: int32 scalar) -> {"images": float32 [N,H,W,C]}
      codes beyond num_codes are ignored, exactly as in training's truncation
  sample(num_samples: int32, num_codes: int32, seed: int32, temperature: float32)
      -> {"images": float32 [N,H,W,C] in [0,1], "codes": int32 [N,K]}
      the XLA anytime sampler; codes beyond num_codes are FILL_CODE (0)

Interruptible sampling, for a server that batches requests and stops each at its deadline:

  begin(num_samples: int32, seed: int32)
      -> {"codes": int32 [N,K], "cache": float32 [L,2,N,heads,K,head_dim],
          "position": int32 [N], "seeds": int32 [N]}
      a fresh state; `seeds` are the rows' random streams (row i of a request with `seed`)
  extend(codes, cache, position, seeds, temperature: float32 [N] > 0, limit: int32 [N],
         steps: int32) -> {"codes", "cache", "position", "finite": bool}
      advances each row with position < limit by up to `steps` codes (both clipped to
      [0, K]); rows of different requests may share a call, each drawing from its own
      stream; one XLA program per batch size
  decode_at(codes: int32 [N,K], num_codes: int32 [N]) -> {"images": float32 [N,H,W,C]}
      row n decoded from its first num_codes[n] codes

Adaptive-length codes:

  encode_to_quality(images: float32 [N,H,W,C] in [0,1], max_mse: float32 scalar > 0)
      -> {"codes": int32 [N,K] (0 beyond num_codes), "num_codes": int32 [N],
          "mse": float32 [N]}
      each image's smallest k whose reconstruction has MSE <= max_mse (K when none has),
      found by decoding the prefixes k = 1, 2, ... of the images that have not met it yet
      (each image costs its own num_codes decodes); "mse" is its reconstruction's MSE at
      num_codes. A PSNR target p is max_mse = 10^(-p/10).

A row's codes depend only on (seed, row): `begin` + `extend` to k give the codes `sample`
gives for k.

and attributes `code_length`, `codebook_size` and `image_shape` (int32 variables), and
`quality_profile`, a JSON string variable: what quality and time each k gives, as
measured at export (`{}` when the exporter measured none).
Out-of-range arguments fail inside the signature with a message naming the value.
"""

from __future__ import annotations

import glob
import json
import os

import tensorflow as tf

from ordered_vqvae.atomic import atomic_directory
from ordered_vqvae.generator import ImageGenerator
from ordered_vqvae.sampler import SamplingState, row_seeds
from ordered_vqvae.validation import check_num_codes

SIGNATURES = ("encode", "decode", "sample", "begin", "extend", "decode_at",
              "encode_to_quality")


def _stacked(cache):
    """The prior's cache, a (keys, values) pair per layer, as one [L, 2, B, ...] tensor."""
    return tf.stack([tf.stack(kv) for kv in cache])


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
        heads = prior.num_heads
        cache_shape = [len(prior.blocks), 2, None, heads, K, prior.width // heads]
        self.begin = tf.function(self._begin, input_signature=[
            tf.TensorSpec([], tf.int32, name="num_samples"),
            tf.TensorSpec([], tf.int32, name="seed")])
        self.extend = tf.function(self._extend, jit_compile=True, input_signature=[
            tf.TensorSpec([None, K], tf.int32, name="codes"),
            tf.TensorSpec(cache_shape, tf.float32, name="cache"),
            tf.TensorSpec([None], tf.int32, name="position"),
            tf.TensorSpec([None], tf.int32, name="seeds"),
            tf.TensorSpec([None], tf.float32, name="temperature"),
            tf.TensorSpec([None], tf.int32, name="limit"),
            tf.TensorSpec([], tf.int32, name="steps")])
        self.decode_at = tf.function(self._decode, input_signature=[  # One k per row.
            tf.TensorSpec([None, K], tf.int32, name="codes"),
            tf.TensorSpec([None], tf.int32, name="num_codes")])
        self.encode_to_quality = tf.function(self._encode_to_quality, input_signature=[
            tf.TensorSpec([None, h, w, c], tf.float32, name="images"),
            tf.TensorSpec([], tf.float32, name="max_mse")])

    def _encode(self, images):
        return {"codes": self.autoencoder.encode(images)}

    def _encode_to_quality(self, images, max_mse):
        K = self._K
        with tf.control_dependencies([tf.debugging.Assert(
                max_mse > 0.0, ["max_mse=", max_mse, "must be > 0"])]):
            codes = self.autoencoder.encode(images)
        n = tf.shape(codes)[0]

        def more(k, pending, found, mse):
            return (k <= K) & (tf.size(pending) > 0)

        def prefix(k, pending, found, mse):
            # Only the images still searching are decoded, so the cost follows the
            # images' own k (their sum), not the batch's largest k times the batch.
            error = tf.reduce_mean(tf.square(
                self.autoencoder.decode(tf.gather(codes, pending), k)
                - tf.gather(images, pending)), axis=[1, 2, 3])
            settle = (error <= max_mse) | (k == K)
            rows = tf.boolean_mask(pending, settle)[:, None]
            found = tf.tensor_scatter_nd_update(found, rows, tf.fill([tf.shape(rows)[0]], k))
            mse = tf.tensor_scatter_nd_update(mse, rows, tf.boolean_mask(error, settle))
            return k + 1, tf.boolean_mask(pending, ~settle), found, mse

        _, _, found, mse = tf.while_loop(
            more, prefix, (tf.constant(1), tf.range(n), tf.zeros([n], tf.int32),
                           tf.zeros([n], tf.float32)),
            shape_invariants=(tf.TensorShape([]), tf.TensorShape([None]),
                              tf.TensorShape([None]), tf.TensorShape([None])))
        kept = tf.sequence_mask(found, K)
        return {"codes": tf.where(kept, codes, tf.zeros_like(codes)), "num_codes": found,
                "mse": mse}

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
        codes, finite = self.generator.sampler.generate(prefix, tf.constant(0), num_codes, seed,
                                                        self._settings(temperature))
        with tf.control_dependencies([tf.debugging.Assert(finite, ["the prior produced NaN or "
                                                                   "Inf logits"])]):
            images = self.autoencoder.decode(codes, num_codes)
        return {"images": images, "codes": codes}


    def _settings(self, temperature):
        sampler = self.generator.sampler
        settings = {f.name: tf.constant(f.default, f.dtype) for f in sampler.filters}
        settings["temperature"] = temperature
        return settings

    def _begin(self, num_samples, seed):
        with tf.control_dependencies([tf.debugging.Assert(
                num_samples >= 1, ["num_samples=", num_samples, "must be >= 1"])]):
            state = self.generator.sampler.begin(num_samples)
        return {"codes": state.codes, "cache": _stacked(state.cache),
                "position": state.position, "seeds": row_seeds(seed, num_samples)}

    def _extend(self, codes, cache, position, seeds, temperature, limit, steps):
        # Compiled whole with XLA, where assertions do not run: limits and steps are
        # clipped to [0, K]; the caller (the server) checks temperatures.
        limit = tf.clip_by_value(limit, 0, self._K)
        steps = tf.clip_by_value(steps, 0, self._K)
        state = SamplingState(codes, [tuple(tf.unstack(kv)) for kv in tf.unstack(cache)],
                              position, tf.constant(True))
        state = self.generator.sampler.extend(state, steps, seeds, limit,
                                              self._settings(temperature))
        return {"codes": state.codes, "cache": _stacked(state.cache),
                "position": state.position, "finite": state.finite}


def export(autoencoder, prior, path: str, profile=None) -> str:
    """Writes the SavedModel to `path` atomically (temp dir beside it, then rename). The
    prior computes in float32 (its projection kernels may be bfloat16: `load_prior(dtype=
    "bfloat16_weights")`), as the signatures' float32 key/value cache needs. `profile`:
    a function of the built module returning a JSON-able dict, stored as its
    `quality_profile`."""
    if prior.compute_dtype != "float32":
        raise ValueError(f"the prior computes in {prior.compute_dtype}; the SavedModel's "
                         "key/value cache is float32: export a prior loaded with dtype "
                         "'float32' or 'bfloat16_weights'")
    module = AnytimeModel(autoencoder, prior)
    module.quality_profile = tf.Variable(json.dumps(profile(module) if profile else {}),
                                         trainable=False, name="quality_profile")
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
