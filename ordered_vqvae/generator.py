"""Images from a code prior and the ordered VQ-VAE whose codes it models.

`ImageGenerator` pairs an `AnytimeSampler` over the prior with the autoencoder's decoder:
sample k codes, decode them with the autoencoder's own truncation fill, exactly as in
training. One pass can be decoded at several k (`sample_progressive`), and a fixed
"priority" prefix can be completed (`complete`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from ordered_vqvae.sampler import AnytimeSampler
from ordered_vqvae.validation import check_num_codes


class ImageGenerator:
    """Args:
      prior: a `CodePrior` over the autoencoder's codes.
      autoencoder: the `OrderedVQVAE`.
      jit_compile: compile the sampling loop with XLA (the fast path).
    """

    def __init__(self, prior, autoencoder, jit_compile: bool = True):
        if prior.code_length != autoencoder.code_length:
            raise ValueError(f"the prior models K={prior.code_length} codes but the autoencoder "
                             f"has K={autoencoder.code_length}")
        if prior.codebook_size != autoencoder.codebook_size:
            raise ValueError(f"the prior's vocabulary is {prior.codebook_size} codes but the "
                             f"autoencoder's codebook has {autoencoder.codebook_size}")
        self.prior, self.autoencoder = prior, autoencoder
        self.code_length = prior.code_length
        self.sampler = AnytimeSampler.for_prior(prior, jit_compile=jit_compile)
        self.decode = tf.function(autoencoder.decode)

    def sample_codes(self, num_samples: int, num_codes: int, seed: int = 0,
                     **settings) -> tf.Tensor:
        """Codes int32 [num_samples, K], the first `num_codes` sampled, the rest FILL_CODE."""
        return self.sampler.sample_codes(num_samples, num_codes, seed, **settings)

    def sample(self, num_samples: int, num_codes: int, seed: int = 0, **settings):
        """(images float32 [N,H,W,C] in [0,1], codes int32 [N,K]) from k = num_codes.
        `settings`: temperature=, top_k=, top_p= (see `ordered_vqvae.sampler`)."""
        codes = self.sample_codes(num_samples, num_codes, seed, **settings)
        return self.decode(codes, tf.constant(num_codes, tf.int32)), codes

    def sample_progressive(self, num_samples: int, num_codes: Sequence[int], seed: int = 0,
                           **settings):
        """One autoregressive pass to max(num_codes), decoded at every k in `num_codes`.

        Returns ({k: images [N,H,W,C]}, codes [N,K]). The images at a smaller k are exactly
        what `sample` with that k and seed gives: the prefix is shared, not recomputed.
        """
        lengths = sorted(set(int(k) for k in num_codes))
        if not lengths:
            raise ValueError("num_codes is empty, expected at least one k")
        for k in lengths:
            check_num_codes(k, self.code_length)
        codes = self.sample_codes(num_samples, lengths[-1], seed, **settings)
        return {k: self.decode(codes, tf.constant(k, tf.int32)) for k in lengths}, codes

    def complete(self, prefix: np.ndarray, num_fixed: int, num_codes: Optional[int] = None,
                 seed: int = 0, **settings):
        """Keeps the first `num_fixed` codes of each row of `prefix` [N, K] and samples codes
        num_fixed+1..num_codes (K by default). Returns (images, codes)."""
        num_codes = self.code_length if num_codes is None else num_codes
        prefix = np.asarray(prefix)
        codes = self.sampler.sample_codes(len(prefix), num_codes, seed, prefix=prefix,
                                          num_fixed=num_fixed, **settings)
        return self.decode(codes, tf.constant(num_codes, tf.int32)), codes
