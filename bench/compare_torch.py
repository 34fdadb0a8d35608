"""This project against its PyTorch / Hugging Face equivalents, side by side in one run.

Two comparisons, each run in separate processes that alternate (ours, theirs, ours, ...),
so that both see the same machine; every process warms up, then reports the median of its
timed repeats, and the script prints the medians over rounds and their ratios:

1. Sampling codes only, the reference-size prior (6 layers, 8 heads, width 512, FFN 2048;
   K = 64 codes over 256 codewords) at batch 1 and batch 64: `AnytimeSampler.sample_codes`
   (one pass in cache segments, as a long-lived sampler would run it) against
   `transformers`' `GPT2LMHeadModel.generate` with its KV cache (same depth, width, heads,
   FFN and vocabulary; sampling, no stopping token, 64 new tokens).
2. Training the ordered VQ-VAE, MNIST preset (C = 64 channels of 7x7, 256 codewords,
   batch 128, uniform k per example): Keras `fit` against the same model and step written in
   PyTorch (below), in images per second.

Our side runs in the project's .venv; theirs in the optional .venv-peers (torch CPU and
transformers), made by `make bench-peers`. Nothing in the package or its tests imports them.

  .venv/bin/python bench/compare_torch.py [--rounds=3] [--peers=.venv-peers/bin/python]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

from harness import autoencoder_for_fit, timings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS, HEADS, WIDTH, FFN, K, V = 6, 8, 512, 2048, 64, 256
THREADS = 2


def _median_seconds(fn, repeats, warmup=2):
    return statistics.median(timings(fn, repeats, warmup))


# ----------------------------------------------------------------------------- our side


def ours_sampler(batch, repeats):
    import tensorflow as tf

    from ordered_vqvae.configs import prior_preset
    from ordered_vqvae.prior import CodePrior
    from ordered_vqvae.sampler import CACHE_SEGMENTS, AnytimeSampler

    config = prior_preset("reference")
    assert (config.num_layers, config.num_heads, config.width, config.ffn_width) == \
        (LAYERS, HEADS, WIDTH, FFN)
    prior = CodePrior.from_config_for(config, K, V)
    prior(tf.zeros((1, 1), tf.int32))
    sampler = AnytimeSampler.for_prior(prior, cache_segments=CACHE_SEGMENTS)  # Long-lived.
    return _median_seconds(lambda: sampler.sample_codes(batch, K).numpy(), repeats)


def ours_training(steps, repeats):
    import numpy as np

    from ordered_vqvae import configs

    config = configs.preset("mnist")
    images = np.random.default_rng(0).uniform(size=(8192, 28, 28, 1)).astype(np.float32)
    model, ds = autoencoder_for_fit(config, images, (steps,))
    seconds = _median_seconds(
        lambda: model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False),
        repeats, warmup=1)
    return steps * config.batch_size / seconds


# ----------------------------------------------------------------------------- their side


def theirs_sampler(batch, repeats):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=V + 1, n_positions=K + 1, n_embd=WIDTH, n_layer=LAYERS,
                        n_head=HEADS, n_inner=FFN, bos_token_id=V, eos_token_id=None,
                        pad_token_id=V)
    model = GPT2LMHeadModel(config).eval()
    start = torch.full((batch, 1), V, dtype=torch.long)

    def generate():
        with torch.inference_mode():
            out = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True,
                                 top_k=0, max_new_tokens=K, min_new_tokens=K, use_cache=True)
        assert out.shape == (batch, K + 1)

    return _median_seconds(generate, repeats)


def theirs_training(steps, repeats):
    """The ordered VQ-VAE's training step in PyTorch: the same encoder, channel-wise
    quantizer (straight-through, codebook and commitment terms on kept tokens), uniform k
    per example with zero fill, decoder, MSE on [-1, 1] and Adam."""
    import torch
    from torch import nn

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    C, D, B, beta = 64, 49, 128, 0.25
    encoder = nn.Sequential(
        nn.Conv2d(1, 16, 4, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 4, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, C, 3, 1, 1))
    decoder = nn.Sequential(
        nn.Conv2d(C, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 4, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.ConvTranspose2d(16, 1, 4, 2, 1), nn.Tanh())
    codebook = nn.Parameter(torch.empty(V, D).uniform_(-1 / V, 1 / V))
    params = [*encoder.parameters(), *decoder.parameters(), codebook]
    optimizer = torch.optim.Adam(params, lr=2e-3)
    images = torch.rand(8192, 1, 28, 28)

    def step(x):
        target = x * 2 - 1
        tokens = encoder(target).flatten(2)  # [B, C, 49]: one token per channel.
        flat = tokens.reshape(-1, D)
        distances = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t()
                     + codebook.pow(2).sum(1)[None])
        quantized = codebook[distances.argmin(1)].view_as(tokens)
        lengths = torch.randint(1, C + 1, (B,))
        mask = (torch.arange(C)[None] < lengths[:, None]).float()  # [B, C]
        kept = mask.sum()
        commitment = ((tokens - quantized.detach()).pow(2).mean(2) * mask).sum() / kept
        codebook_loss = ((tokens.detach() - quantized).pow(2).mean(2) * mask).sum() / kept
        straight = tokens + (quantized - tokens).detach()
        recon = decoder((straight * mask[:, :, None]).view(B, C, 7, 7))
        loss = (recon - target).pow(2).mean() + codebook_loss + beta * commitment
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def run():
        for i in range(steps):
            start = (i * B) % (len(images) - B)
            step(images[start:start + B])

    return steps * B / _median_seconds(run, repeats, warmup=1)


WORKERS = {"ours_sampler": ours_sampler, "theirs_sampler": theirs_sampler,
           "ours_training": ours_training, "theirs_training": theirs_training}


# ----------------------------------------------------------------------------- driver


def _run_worker(python, name, arg, repeats):
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2",
           "OMP_NUM_THREADS": str(THREADS)}
    out = subprocess.run([python, __file__, f"--worker={name}", f"--arg={arg}",
                          f"--repeats={repeats}"], cwd=REPO, env=env, capture_output=True,
                         text=True)
    if out.returncode:
        sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["value"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train_steps", type=int, default=60)
    parser.add_argument("--peers", default=os.path.join(REPO, ".venv-peers", "bin", "python"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--arg", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker.startswith("ours_"):
            from ordered_vqvae import xla

            xla.prefer_wide_vectors()  # As the ovqvae command does, before anything compiles.
        print(json.dumps({"value": WORKERS[args.worker](args.arg, args.repeats)}))
        return
    if not os.path.exists(args.peers):
        sys.exit(f"{args.peers} not found: run `make bench-peers` first (torch CPU and "
                 "transformers in their own environment)")
    cases = [("sampler, batch 1 (s)", "sampler", 1, "lower"),
             ("sampler, batch 64 (s)", "sampler", 64, "lower"),
             ("training (images/s)", "training", args.train_steps, "higher")]
    for label, kind, arg, better in cases:
        values = {"ours": [], "theirs": []}
        for _ in range(args.rounds):
            values["ours"].append(_run_worker(sys.executable, f"ours_{kind}", arg, args.repeats))
            values["theirs"].append(_run_worker(args.peers, f"theirs_{kind}", arg, args.repeats))
        ours, theirs = (statistics.median(v) for v in values.values())
        print(f"{label:24s} ours {ours:9.4f} {values['ours']}  theirs {theirs:9.4f} "
              f"{values['theirs']}  ours/theirs {ours / theirs:.2f} ({better} is better)",
              flush=True)


if __name__ == "__main__":
    main()
