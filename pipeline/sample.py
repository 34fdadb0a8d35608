"""`ovqvae sample`: a grid with a row per k, and an .npz, from a SavedModel."""

from __future__ import annotations

import os
from typing import Optional

from pipeline.run_config import UsageError


def code_counts(values, K: int) -> list:
    """--num_codes items (counts like "8", or shares of K like "25%") -> sorted distinct k in
    [1, K]; a share rounds to the nearest count, at least 1."""
    counts = []
    for value in values or [str(K)]:
        text = value.strip()
        try:
            k = (max(1, round(float(text[:-1]) * K / 100)) if text.endswith("%")
                 and 0 < float(text[:-1]) <= 100 else int(text))
        except ValueError:
            k = None
        if k is None or not 1 <= k <= K:
            raise UsageError(f"--num_codes={value}, expected 1 <= num_codes <= {K}, or a share "
                             "of K in (0%, 100%]")
        counts.append(k)
    return sorted(set(counts))


def _output(output: Optional[str], workdir: Optional[str], ks: list, seed: int) -> str:
    """`output`, or WORKDIR/samples/samples_k<ks>_seed<seed>.png."""
    if output:
        return output
    if not workdir:
        raise UsageError("sample needs --output=PATH.png (or --workdir, to write the grid "
                         "under WORKDIR/samples)")
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    return os.path.join(workdir, "samples", f"samples_k{'-'.join(map(str, ks))}_seed{seed}.png")


def sample(saved_model: str, num_codes: Optional[list], num_samples: int, seed: int,
           temperature: float, output: Optional[str], workdir: Optional[str]) -> str:
    """`ovqvae sample`: samples once at the largest k and decodes each k's prefix of the
    same codes, so the grid's rows show the same samples refining. Returns the grid's path."""
    import numpy as np
    import tensorflow as tf

    from ordered_vqvae import export, figures
    from ordered_vqvae.atomic import atomic_file, check_writable_directory

    if temperature <= 0 or num_samples < 1:
        raise UsageError(f"--temperature={temperature} must be > 0 and --num_samples="
                         f"{num_samples} >= 1")
    export.check_saved_model_dir(saved_model)
    model = tf.saved_model.load(saved_model)
    K = int(model.code_length)
    ks = code_counts(num_codes, K)
    output = _output(output, workdir, ks, seed)
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise OSError(f"cannot write --output={output}: {out_dir!r} is not a directory")
    check_writable_directory(out_dir, "--output directory")
    codes = model.signatures["sample"](
        num_samples=tf.constant(num_samples), num_codes=tf.constant(ks[-1]),
        seed=tf.constant(seed), temperature=tf.constant(temperature, tf.float32))["codes"]
    images = np.stack([model.signatures["decode"](codes=codes, num_codes=tf.constant(k))
                       ["images"].numpy() for k in ks])
    base = os.path.splitext(output)[0]
    with atomic_file(base + ".npz", "wb") as f:
        np.savez(f, images=images, codes=codes.numpy(), num_codes=np.array(ks, np.int32))
    figures.save_image_rows(list(images), [f"k={k}/{K}" for k in ks], output,
                            f"{num_samples} samples, decoded from their first k of {K} codes")
    print(f"[sample] wrote {output} and {base}.npz ({num_samples} samples, a row for "
          f"each k in {ks} of K={K})", flush=True)
    return output
