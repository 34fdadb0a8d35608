"""Anytime sampler speed, measured side by side in one run.

The reference-size prior (6 layers, 8 heads, width 512, FFN 2048) over K=64 codes of a
256-codeword MNIST autoencoder, batch 64, sampled as a long-lived sampler would: its one
pass in `sampler.CACHE_SEGMENTS` cache segments (`cache_segments`). Prints:
  1. time(k) / time(K) for k = K/4, K/2, 3K/4 (linear cost: ~0.25/0.5/0.75 plus the
     decoder's fixed share);
  2. the cached XLA loop against naive sampling that reruns the whole prefix each step;
  3. the cached loop with and without XLA;
  4. interruptible sampling (begin, then extend by chunks of 16, 8, 4 codes) against one
     pass, both to k = K;
  5. the sampler's achieved GFLOP/s (codes only, k = K) at batch 1 and the chosen batch,
     against this machine's dense float32 matmul peak, and the rate at which batch 1
     streams the weights (every step reads all of them) against the rate at which the
     machine reads memory (a sum over 512 MB), each reference timed in turn with the
     sampler (see `in_turn`), batch 1 with its one-row products split (the default for this
     prior, see `prior.row_matmul`) against whole, the chosen batch's one pass in cache
     segments against one loop whose every step attends to all K cached positions (the
     default), their first calls (trace and compile) and their passes, and the rate of one
     step's projections alone (the prior's own weight matrices, chained) with and without
     XLA: the ceiling XLA's dots set for the sampler at that batch;
  6. the prior's bfloat16 copies (`load_prior(dtype="bfloat16")`: everything in bfloat16;
     `"bfloat16_weights"`: bfloat16 projection kernels, float32 activations and cache)
     against float32 (and, under XLA, the float32 matmul peak), timed in turn, with and
     without XLA, at batch 1 and the chosen batch, and the dense bfloat16 matmul peak both
     ways (bench/bf16_drift.py measures how far samples drift).

  .venv/bin/python bench/sampler_speed.py [--batch=64] [--repeats=3]
"""

import argparse
import os
import statistics
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

from ordered_vqvae import configs, models
from ordered_vqvae.configs import prior_preset
from ordered_vqvae.generator import ImageGenerator
from ordered_vqvae.prior import CodePrior, load_prior, save_prior
from ordered_vqvae.sampler import CACHE_SEGMENTS, FILL_CODE, row_seeds
from ordered_vqvae.xla import prefer_wide_vectors
from harness import timings

prefer_wide_vectors()  # As the ovqvae command does, before anything compiles.


def best_time(fn, repeats):
    return min(timings(fn, repeats))


def in_turn(fns, rounds):
    """name -> seconds of each of `rounds` calls of `fns[name]` (each called once untimed
    first), the callables taking turns, so that all see the same machine: a shared one's
    speed drifts by up to 2x between minutes, and a reference timed apart from the program
    it is a reference for (a matmul peak, a memory read rate) can then fall below what that
    program itself reaches."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += timings(fn, 1, warmup=0)
    return times


def dense_matmul(n=2048, dtype=tf.float32, jit_compile=True):
    """(a call of a [n, n] x [n, n] matmul, its FLOPs); without XLA TensorFlow's own kernel,
    oneDNN on x86."""
    a = tf.cast(tf.random.normal((n, n)), dtype)
    matmul = tf.function(lambda x: tf.matmul(x, x), jit_compile=jit_compile)
    return lambda: matmul(a).numpy(), 2 * n**3


def matmul_peak(repeats, **kwargs):
    """GFLOP/s of `dense_matmul(**kwargs)`, best of `repeats`."""
    call, flop = dense_matmul(**kwargs)
    return flop / best_time(call, repeats) / 1e9


def memory_read(megabytes=512):
    """(a sum of a float32 array of `megabytes`, far larger than any cache, by TensorFlow's
    own multi-threaded reduction; the bytes it reads): how fast this machine reads memory."""
    x = tf.ones([megabytes * 2**20 // 4])
    total = tf.function(tf.reduce_sum)
    return lambda: total(x).numpy(), x.shape[0] * 4


def against(times, work, reference_times, reference_work):
    """A program's best rate (work per second), the reference's best rate, and the median
    over rounds of the program's rate / the reference's rate in the same round."""
    rate = [work / t for t in times]
    reference = [reference_work / t for t in reference_times]
    return max(rate), max(reference), statistics.median(a / b for a, b in zip(rate, reference))


def projection_flops(prior):
    """FLOPs of one sampling step's projections for one row: per layer the fused QKV,
    output and two FFN matmuls."""
    W, F = prior.width, prior.ffn_width
    return prior.num_layers * (2 * W * 3 * W + 2 * W * W + 2 * 2 * W * F)


def flops_per_code(prior):
    """FLOPs of one sampling step of one row: the projections, attention over all K cached
    positions in every layer, then the output head. (One pass reads about 9/16 of the K
    positions in cache segments, see `AnytimeSampler`; the count stays that of a cache of
    K.)"""
    W, K, V = prior.width, prior.code_length, prior.codebook_size
    return projection_flops(prior) + prior.num_layers * 2 * 2 * W * K + 2 * W * V


def projection_rate(prior, batch, repeats, jit_compile=True):
    """GFLOP/s of one sampling step's projections alone at `batch` rows: per block the
    fused QKV, output and two FFN matmuls on the prior's own kernels, chained as in the
    step (attention, norms and activations left out)."""
    kernels = [(b.qkv.kernel, b.proj.kernel, b.ffn_in.kernel, b.ffn_out.kernel)
               for b in prior.blocks]
    x = tf.random.normal((batch, prior.width))

    @tf.function(jit_compile=jit_compile)
    def step(x):
        for qkv, proj, ffn_in, ffn_out in kernels:
            x = x + tf.matmul(tf.matmul(x, qkv)[:, :prior.width], proj)
            x = x + tf.matmul(tf.matmul(x, ffn_in), ffn_out)
        return x

    return (batch * projection_flops(prior) / best_time(lambda: step(x).numpy(), repeats * 10)
            / 1e9)


def naive_sampler(prior, batch, jit_compile=True):
    """Reruns the full causal pass over the (padded) sequence at every step: no cache."""
    K = prior.code_length

    @tf.function(jit_compile=jit_compile)
    def generate(num_codes, seed):
        def body(i, tokens):
            logits = prior(tokens)[:, i]
            drawn = tf.random.stateless_categorical(logits, 1, tf.stack([seed, i]),
                                                    dtype=tf.int32)[:, 0]
            # Position i+1 of the input holds code i.
            update = tf.one_hot(i + 1, K + 1, dtype=tf.int32)[None, :K]
            return i + 1, tokens * (1 - update) + drawn[:, None] * update

        tokens = tf.concat([tf.fill([batch, 1], prior.start_token),
                            tf.fill([batch, K - 1], FILL_CODE)], axis=1)
        _, tokens = tf.while_loop(lambda i, _: i < num_codes, body, (tf.constant(0), tokens),
                                  maximum_iterations=K)
        return tokens

    return generate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ae = models.OrderedVQVAE(configs.preset("mnist"))
    ae(tf.zeros((1, 28, 28, 1)))
    K, V, B = ae.code_length, ae.codebook_size, args.batch
    prior = CodePrior.from_config_for(prior_preset("reference"), K, V)
    prior(tf.zeros((1, 1), tf.int32))  # Built, as saving a copy needs.
    xla, eager_loop = (ImageGenerator(prior, ae, jit_compile=jit,
                                      cache_segments=CACHE_SEGMENTS) for jit in (True, False))

    print(f"prior: 6 layers, 8 heads, width 512; K={K}, vocabulary {V}, batch {B}")
    full = best_time(lambda: xla.sample(B, K)[0].numpy(), args.repeats)
    print(f"1. cached XLA sampler, k=K={K}: {full:.3f} s (codes + decode)")
    for frac in (0.25, 0.5, 0.75):
        k = int(K * frac)
        t = best_time(lambda: xla.sample(B, k)[0].numpy(), args.repeats)
        print(f"   k={k:3d}: {t:.3f} s, time(k)/time(K) = {t / full:.2f} (linear: {frac:.2f})")
    cached_codes = best_time(lambda: xla.sample_codes(B, K).numpy(), args.repeats)
    naive = naive_sampler(prior, B)
    naive_codes = best_time(lambda: naive(tf.constant(K), tf.constant(0)).numpy(), args.repeats)
    print(f"2. codes only, k=K: cached XLA {cached_codes:.3f} s, naive full-prefix XLA "
          f"{naive_codes:.3f} s: cache speed-up {naive_codes / cached_codes:.1f}x")
    no_xla = best_time(lambda: eager_loop.sample_codes(B, K).numpy(), args.repeats)
    print(f"3. cached loop without XLA {no_xla:.3f} s: XLA speed-up {no_xla / cached_codes:.1f}x")
    sampler = xla.sampler
    settings, seeds, limits = sampler.settings(), row_seeds(0, B), tf.fill([B], K)

    def chunked(chunk):
        state = sampler.begin(B)
        for _ in range(-(-K // chunk)):
            state = sampler.extend(state, tf.constant(chunk), seeds, limits, settings)
        return state.codes.numpy()

    print("4. interruptible sampling to k=K in chunks (one compiled call per chunk):")
    for chunk in (16, 8, 4):
        t = best_time(lambda: chunked(chunk), args.repeats)
        print(f"   chunks of {chunk:2d}: {t:.3f} s, {t / cached_codes:.2f}x the one-pass time")
    rounds = max(args.repeats, 5)
    print(f"5. the sampler, codes only, k=K ({flops_per_code(prior) / 1e6:.1f} MFLOP per code "
          f"and row), against the dense float32 matmul peak (2048^3, XLA) and, at batch 1, "
          f"the rate at which this machine reads memory, each timed in turn with it "
          f"({rounds} rounds; the median ratio over the rounds, the best rates):")
    matmul, matmul_flop = dense_matmul()
    read, read_bytes = memory_read()
    weight_bytes = sum(int(tf.size(w)) * tf.as_dtype(w.dtype).size for w in prior.weights)
    peak = 0
    for batch in sorted({1, B}):
        fns = {"sampler": lambda: xla.sample_codes(batch, K).numpy(), "peak": matmul}
        times = in_turn({**fns, "read": read} if batch == 1 else fns, rounds)
        flop = batch * K * flops_per_code(prior)
        rate, batch_peak, ratio = against(times["sampler"], flop, times["peak"], matmul_flop)
        peak = max(peak, batch_peak / 1e9)  # GFLOP/s, for the comparisons below.
        t = min(times["sampler"])
        print(f"   batch {batch:3d}: {t:.3f} s, {1000 * t / K:.2f} ms per code, "
              f"{rate / 1e9:.1f} GFLOP/s: {ratio:.0%} of the peak ({batch_peak / 1e9:.0f} "
              f"GFLOP/s)")
        if batch == 1:  # Every step reads every weight once, whatever the batch.
            streamed, fastest, share = against(times["sampler"], weight_bytes * K,
                                               times["read"], read_bytes)
            print(f"   (batch 1 streams all {weight_bytes / 1e6:.0f} MB of weights per code: "
                  f"{streamed / 1e9:.1f} GB/s, {share:.0%} of the rate at which this machine "
                  f"reads memory ({fastest / 1e9:.1f} GB/s, a sum over 512 MB))")
            parts, prior.row_product_parts = prior.row_product_parts, 1
            whole = ImageGenerator(prior, ae, jit_compile=True)
            whole.sample_codes(1, K).numpy()  # Traced with whole one-row products.
            prior.row_product_parts = parts
            best = {name: min(v) for name, v in in_turn(
                {"split": lambda: xla.sample_codes(1, K).numpy(),
                 "whole": lambda: whole.sample_codes(1, K).numpy()}, args.repeats).items()}
            print(f"   one-row products in {parts} parts (this prior's default) against whole: "
                  f"{1000 * best['split'] / K:.2f} against {1000 * best['whole'] / K:.2f} ms per "
                  f"code, ratio {best['split'] / best['whole']:.2f}")
        else:
            fresh = {s: ImageGenerator(prior, ae, jit_compile=True, cache_segments=s)
                     for s in (CACHE_SEGMENTS, 1)}
            first = {s: timings(lambda g=g: g.sample_codes(batch, K).numpy(), 1, warmup=0)[0]
                     for s, g in fresh.items()}  # Trace and compile.
            one_loop = fresh[1]  # Every step attends to all K cached positions.
            best = {name: min(v) for name, v in in_turn(
                {"grown": lambda: xla.sample_codes(batch, K).numpy(),
                 "whole": lambda: one_loop.sample_codes(batch, K).numpy()},
                args.repeats).items()}
            print(f"   one pass in {CACHE_SEGMENTS} cache segments against one loop over all K "
                  f"cached positions (the default): {1000 * best['grown'] / K:.2f} against "
                  f"{1000 * best['whole'] / K:.2f} ms per code, ratio "
                  f"{best['grown'] / best['whole']:.2f}; first call (trace and compile) "
                  f"{first[CACHE_SEGMENTS]:.1f} against {first[1]:.1f} s")
        xla_rate, tf_rate = (projection_rate(prior, batch, args.repeats, jit)
                             for jit in (True, False))
        print(f"   one step's projections alone at batch {batch}: XLA {xla_rate:.0f} GFLOP/s "
              f"({xla_rate / peak:.0%} of the peak), TensorFlow's own kernels {tf_rate:.0f} "
              f"({tf_rate / peak:.0%})")
    with tempfile.TemporaryDirectory() as directory:
        save_prior(prior, directory)
        copies = {d: load_prior(directory, d) for d in ("bfloat16", "bfloat16_weights")}
    print("6. bfloat16 copies of the prior against float32, codes only, k=K (timed in turn, "
          "with the float32 matmul peak under XLA; ratio < 1: the copy is faster):")
    for jit, reference in ((True, xla), (False, eager_loop)):
        samplers = {"float32": reference.sample_codes,
                    **{d: ImageGenerator(p, ae, jit_compile=jit,
                                         cache_segments=CACHE_SEGMENTS).sample_codes
                       for d, p in copies.items()}}
        for batch in sorted({1, B}):
            fns = {d: lambda fn=fn: fn(batch, K).numpy() for d, fn in samplers.items()}
            times = in_turn({**fns, "peak": matmul} if jit else fns, args.repeats)
            t = {d: min(times[d]) for d in samplers}
            flop = batch * K * flops_per_code(prior)

            def share(d):  # Of the float32 peak, timed in turn with it.
                return (f", {against(times[d], flop, times['peak'], matmul_flop)[2]:.0%} of "
                        "the peak" if jit else "")

            print(f"   {'XLA' if jit else 'no XLA'}, batch {batch:3d}: float32 {t['float32']:.3f} "
                  f"s ({flop / t['float32'] / 1e9:.0f} GFLOP/s{share('float32')}); " + "; ".join(
                      f"{d} {t[d]:.3f} s ({flop / t[d] / 1e9:.0f} GFLOP/s{share(d)}), ratio "
                      f"{t[d] / t['float32']:.2f}" for d in copies))
    for jit in (True, False):
        bf16 = matmul_peak(args.repeats, dtype=tf.bfloat16, jit_compile=jit)
        f32 = peak if jit else matmul_peak(args.repeats, jit_compile=False)
        print(f"   dense matmul peak {'with' if jit else 'without'} XLA: float32 {f32:.0f}, "
              f"bfloat16 {bf16:.0f} GFLOP/s ({bf16 / f32:.2f}x)")


if __name__ == "__main__":
    main()
