"""Images from a code prior and the ordered VQ-VAE whose codes it models.

`ImageGenerator` pairs an `AnytimeSampler` over the prior with the autoencoder's decoder:
sample k codes, decode them with the autoencoder's own truncation fill, exactly as in
training. One pass can be decoded at several k (`sample_progressive`), refined chunk by
chunk (`refine`), stopped when a deadline is near (`sample_until`), and a fixed "priority"
prefix can be completed (`complete`).
"""

from __future__ import annotations

import time
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from ordered_vqvae.budget import CostModel, plan_chunk
from ordered_vqvae.sampler import AnytimeSampler, row_seeds
from ordered_vqvae.validation import check_num_codes


class ImageGenerator:
    """Args:
      prior: a `CodePrior` over the autoencoder's codes.
      autoencoder: the `OrderedVQVAE`.
      jit_compile: compile the sampling loop with XLA (the fast path).
      cache_segments: the sampler's (see `AnytimeSampler`): more than 1 pays in a generator
        that samples many batches of one size.
    """

    def __init__(self, prior, autoencoder, jit_compile: bool = True, cache_segments: int = 1):
        if prior.code_length != autoencoder.code_length:
            raise ValueError(f"the prior models K={prior.code_length} codes but the autoencoder "
                             f"has K={autoencoder.code_length}")
        if prior.codebook_size != autoencoder.codebook_size:
            raise ValueError(f"the prior's vocabulary is {prior.codebook_size} codes but the "
                             f"autoencoder's codebook has {autoencoder.codebook_size}")
        self.prior, self.autoencoder = prior, autoencoder
        self.code_length = prior.code_length
        self.sampler = AnytimeSampler.for_prior(prior, jit_compile=jit_compile,
                                                cache_segments=cache_segments)
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

    # -- interruptible sampling

    def _check_range(self, min_codes: int, max_codes: Optional[int]) -> int:
        max_codes = self.code_length if max_codes is None else int(max_codes)
        check_num_codes(max_codes, self.code_length)
        if not 1 <= min_codes <= max_codes:
            raise ValueError(f"min_codes={min_codes}, expected 1 <= min_codes <= "
                             f"max_codes={max_codes}")
        return max_codes

    def _start(self, num_samples: int, seed: int, max_codes: int, settings: dict):
        """(fresh state, row seeds, row limits, filter settings) of an interruptible pass."""
        return (self.sampler.begin(num_samples), row_seeds(seed, num_samples),
                tf.fill([num_samples], max_codes), self.sampler.settings(**settings))

    def refine(self, num_samples: int, seed: int = 0, chunk: int = 4,
               max_codes: Optional[int] = None, **settings
               ) -> Iterator[Tuple[int, tf.Tensor, tf.Tensor]]:
        """Samples `chunk` codes at a time and yields (k, images, codes) after each chunk,
        until k = max_codes (K by default): a sample that refines as codes arrive. The
        codes at every k are those `sample` gives for that k and seed."""
        max_codes = self._check_range(1, max_codes)
        if chunk < 1:
            raise ValueError(f"chunk={chunk}, expected >= 1")
        state, seeds, limits, values = self._start(num_samples, seed, max_codes, settings)
        k = 0
        while k < max_codes:
            state = self.sampler.extend(state, tf.constant(chunk), seeds, limits, values)
            k = int(state.position[0])
            yield k, self.decode(state.codes, tf.constant(k)), state.codes

    def sample_until(self, seconds: float, num_samples: int, seed: int = 0, chunk: int = 4,
                     min_codes: int = 1, max_codes: Optional[int] = None,
                     costs: Optional[CostModel] = None, **settings):
        """Samples for at most about `seconds` (wall time, decoding included): extends by
        chunks of at most `chunk` codes while the predicted time of the next chunk plus the
        decode still fits, and always reaches `min_codes`; `budget.plan_chunk` decides, as
        it does for the server. The prediction comes from `costs` (a CostModel, which this
        call also teaches; keep one per generator to learn across calls).
        Returns (images, codes, k)."""
        start = time.perf_counter()
        max_codes = self._check_range(min_codes, max_codes)
        if not seconds > 0:
            raise ValueError(f"seconds={seconds}, expected a positive time budget")
        costs = costs if costs is not None else CostModel()
        key = (num_samples, tuple(sorted(settings.items())))
        state, seeds, limits, values = self._start(num_samples, seed, max_codes, settings)
        k = 0
        while k < max_codes:
            left = seconds - (time.perf_counter() - start)
            retire, steps = plan_chunk(costs, key, [(left, k, min_codes, max_codes)], chunk)
            if retire:
                break
            learning = costs.affordable_codes(key, left, max_codes - k) is None
            tick = time.perf_counter()
            state = self.sampler.extend(state, tf.constant(steps), seeds, limits, values)
            k = int(state.position[0])
            costs.observe_extend(key, steps, time.perf_counter() - tick)
            if learning:  # Nothing known yet: learn the decode cost too.
                tick = time.perf_counter()
                self.decode(state.codes, tf.constant(k)).numpy()
                costs.observe_decode(key, time.perf_counter() - tick)
        tick = time.perf_counter()
        images = self.decode(state.codes, tf.constant(k))
        images.numpy()
        costs.observe_decode(key, time.perf_counter() - tick)
        return images, state.codes, k

