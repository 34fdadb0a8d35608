"""The one validator: images, codes, k and configuration values, with messages that name the
bad value and what was expected.

NumPy arrays and Python numbers are checked eagerly (ValueError); tensors inside a
`tf.function` (the SavedModel's signatures, the compiled sampler) are checked in-graph
(tf.errors.InvalidArgumentError at run time, same wording).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

# -- configuration values


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}, expected one of {tuple(choices)}")


def check_at_least(name: str, value, low, what: str = "") -> None:
    if value < low:
        raise ValueError(f"{name}={value}, expected {what or f'>= {low}'}")


def check_between(name: str, value, low, high, low_open: bool = False,
                  high_open: bool = False) -> None:
    """low <= value <= high, with either end open when asked."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        raise ValueError(f"{name}={value}, expected {low} {'<' if low_open else '<='} {name} "
                         f"{'<' if high_open else '<='} {high}")


# -- the training loss

NONFINITE_LOSS = "non-finite training loss"


def finite_loss(loss, steps_done):
    """The NaN guard: `loss`, with an in-graph check that stops the step before any update
    when it is NaN or Inf. Models apply it to the loss they differentiate (Keras' running
    means would hide a NaN from the logs), with `steps_done` their optimizer's step count
    (`optimizer.iterations`), which the failure reports (`failed_step` reads it back)."""
    import tensorflow as tf

    check = tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(loss)),
                                [NONFINITE_LOSS, steps_done])
    with tf.control_dependencies([check]):
        return tf.identity(loss)


def failed_step(error: Exception):
    """The step (1-based) whose loss `finite_loss` found not finite, from its error, or None."""
    found = re.search(re.escape(NONFINITE_LOSS) + r"\] \[(\d+)\]", str(error))
    return int(found.group(1)) + 1 if found else None


# -- k, the number of codes kept


def check_num_codes(num_codes, code_length: int):
    """Validates k against K: 1 <= k <= K. Python ints raise ValueError at once; tensors (a
    scalar, or one k per row) get an in-graph assertion. Returns k as an int32 tensor."""
    import tensorflow as tf

    if isinstance(num_codes, (int, np.integer)) or num_codes is None:
        if num_codes is None or not 1 <= num_codes <= code_length:
            raise ValueError(f"num_codes={num_codes}, expected 1 <= num_codes <= {code_length}")
        return tf.constant(int(num_codes), tf.int32)
    num_codes = tf.cast(num_codes, tf.int32)
    ok = tf.reduce_all(tf.logical_and(num_codes >= 1, num_codes <= code_length))
    check = tf.debugging.Assert(ok, ["num_codes=", num_codes, "is out of range, expected "
                                     f"1 <= num_codes <= {code_length}"])
    with tf.control_dependencies([check]):
        return tf.identity(num_codes)


# -- images


def image_problems(images: np.ndarray, image_shape) -> list:
    """Per image of [N, H, W, C]: why it cannot be used (a string), or None when it can."""
    images = np.asarray(images)
    if images.shape[1:] != tuple(image_shape):
        return [f"shape {images.shape[1:]}, expected {tuple(image_shape)}"] * len(images)
    axes = tuple(range(1, images.ndim))
    finite = np.isfinite(images).all(axis=axes)
    with np.errstate(invalid="ignore"):
        lo, hi = np.nanmin(images, axis=axes), np.nanmax(images, axis=axes)
    reasons = []
    for ok, a, b in zip(finite, lo, hi):
        if not ok:
            reasons.append("NaN or Inf")
        elif a < 0.0 or b > 1.0:
            reasons.append(f"values in [{a:g}, {b:g}], expected [0, 1]")
        else:
            reasons.append(None)
    return reasons


def check_images(images: np.ndarray, image_shape, what: str = "images",
                 first_index: int = 0) -> None:
    """Raises ValueError naming the first problem when images are not a non-empty
    float [N, *image_shape] array in [0, 1]; image indices count from `first_index` (the
    position of a batch in a stream)."""
    images = np.asarray(images)
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"{what} have shape {images.shape}, expected [N, "
                         f"{', '.join(map(str, image_shape))}]")
    if len(images) == 0:
        raise ValueError(f"{what} are empty, expected at least one image")
    for index, problem in enumerate(image_problems(images, image_shape)):
        if problem == "NaN or Inf":
            raise ValueError(f"{what} contain NaN or Inf at image index {first_index + index}")
        if problem:
            raise ValueError(f"{what} have {problem} (image index {first_index + index})")


def check_image_tensor(images, image_shape):
    """The tensor form of `check_images`, for graphs: the static shape is checked at once
    (ValueError), finiteness and range in-graph. Returns the images as float32."""
    import tensorflow as tf

    images = tf.convert_to_tensor(images, tf.float32)
    if images.shape.rank != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"images have shape {tuple(images.shape)}, expected [N, "
                         f"{', '.join(map(str, image_shape))}]")
    lo, hi = tf.reduce_min(images), tf.reduce_max(images)
    checks = [
        tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(images)),
                            ["images contain NaN or Inf"]),
        tf.debugging.Assert(tf.logical_and(lo >= 0.0, hi <= 1.0),
                            ["image values must be in [0, 1], got min", lo, "max", hi]),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(images)


# -- codes


def check_codes(codes, code_length: int, codebook_size: int, num_codes=None,
                what: str = "codes"):
    """Validates codes [N, K] in 0..codebook_size-1. With `num_codes` (k: a scalar, or one
    per row for tensors) only the first k positions are checked: what follows is ignored by
    decoding, whatever it holds.

    NumPy arrays and lists raise ValueError at once (returns int32 [N, K]); tensors are
    checked in-graph (returns them as int32)."""
    import tensorflow as tf

    if not tf.is_tensor(codes):
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != code_length:
            raise ValueError(f"{what} have shape {codes.shape}, expected [N, {code_length}]")
        if codes.size and not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"{what} have dtype {codes.dtype}, expected an integer type")
        kept = codes[:, :code_length if num_codes is None else int(num_codes)]
        if kept.size and (kept.min() < 0 or kept.max() >= codebook_size):
            raise ValueError(f"{what} span [{kept.min()}, {kept.max()}], expected "
                             f"[0, {codebook_size - 1}] (codebook_size={codebook_size})")
        return codes.astype(np.int32)
    if codes.shape.rank != 2 or codes.shape[1] != code_length:
        raise ValueError(f"{what} have shape {tuple(codes.shape)}, expected [N, {code_length}]")
    if not codes.dtype.is_integer:
        raise ValueError(f"{what} have dtype {codes.dtype.name}, expected an integer type")
    codes = tf.cast(codes, tf.int32)
    if num_codes is not None:
        codes_kept = tf.range(code_length)[None, :] < tf.reshape(num_codes, [-1, 1])
        kept = tf.where(codes_kept, codes, 0)
    else:
        kept = codes
    flat = tf.concat([tf.reshape(kept, [-1]), [0]], 0)  # The 0 keeps an empty batch valid.
    lo, hi = tf.reduce_min(flat), tf.reduce_max(flat)
    check = tf.debugging.Assert(
        tf.logical_and(lo >= 0, hi < codebook_size),
        [f"{what} must be in [0, codebook_size={codebook_size}), got min", lo, "max", hi])
    with tf.control_dependencies([check]):
        return tf.identity(codes)


def op_error_text(error) -> str:
    """A TensorFlow op error's message without graph plumbing: function and node names,
    `[Op:...]` suffixes and the nested `[[...]]` context lines."""
    lines = []
    for line in error.message.strip().splitlines():
        line = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\].*$", "", line).strip()
        if line and not line.startswith("[["):
            lines.append(line)
    return " ".join(lines) or error.message
