"""Code extraction throughput: the Beam job against the same work done in-process.

Both read MNIST training images, encode them in batches of 256 with the MNIST-preset
encoder and write TFRecords of code indices; the in-process baseline does it in a plain
loop. Each runs at two sizes (6,000 and 60,000 images by default), so that a fit of
seconds = fixed + images / rate separates Beam's fixed start-up from its marginal
throughput. Prints both, and the ratio of the marginal throughputs, from one run.

  .venv/bin/python bench/extract_throughput.py --mnist=../shared/data/mnist [--workers=2]
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

from ordered_vqvae import configs, models
from ordered_vqvae.xla import prefer_wide_vectors
from pipeline import extract, schema, sources
from pipeline.config import DataConfig

prefer_wide_vectors()  # As the ovqvae command does, before anything compiles.


def in_process(autoencoder_dir, mnist, out_dir, limit, batch_size=256):
    model = models.load_autoencoder(autoencoder_dir)
    encode = tf.function(model.encode, input_signature=[
        tf.TensorSpec((None,) + model.image_shape, tf.float32)])
    ds, _ = sources.load("mnist", "train", path=mnist)
    os.makedirs(out_dir)
    with tf.io.TFRecordWriter(os.path.join(out_dir, "train.tfrecord")) as writer:
        for batch in ds.take(limit).batch(batch_size).as_numpy_iterator():
            codes = encode(batch["image"]).numpy()
            for record_id, label, row in zip(batch["id"], batch["label"], codes):
                writer.write(schema.serialize_example(record_id.decode(), label, row, "train"))


def beam(autoencoder_dir, mnist, out_dir, limit, workers):
    beam_args = []
    if workers > 1:
        beam_args = [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
    meta = extract.run(autoencoder_dir, out_dir, DataConfig("mnist", path=mnist, max_train=limit),
                       splits=["train"], beam_args=beam_args)
    assert meta["counts"]["train"] == limit, meta["counts"]


def fit(sizes, seconds):
    """(fixed seconds, images per second) through two points."""
    (n1, n2), (t1, t2) = sizes, seconds
    rate = (n2 - n1) / (t2 - t1)
    return t1 - n1 / rate, rate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", required=True, help="directory of the MNIST IDX files")
    parser.add_argument("--sizes", type=int, nargs=2, default=[6_000, 60_000])
    parser.add_argument("--workers", type=int, default=1, help="Beam worker processes")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp()
    model = models.OrderedVQVAE(configs.preset("mnist"))
    model(tf.zeros((1, 28, 28, 1)))
    ae = models.save_autoencoder(model, os.path.join(tmp, "ae"))
    runner = "FnApiRunner" if args.workers == 1 else f"{args.workers} processes"
    seconds = {"in-process": [], f"Beam ({runner})": []}
    for n in args.sizes:
        for name, job in zip(seconds, (
                lambda out: in_process(ae, args.mnist, out, n),
                lambda out: beam(ae, args.mnist, out, n, args.workers))):
            start = time.perf_counter()
            job(os.path.join(tmp, f"{name.split()[0]}-{n}"))
            seconds[name].append(time.perf_counter() - start)
            print(f"{name:24s} {n:6d} images: {seconds[name][-1]:6.1f} s", flush=True)
    rates = {}
    for name, times in seconds.items():
        fixed, rates[name] = fit(args.sizes, times)
        print(f"{name:24s} fixed {fixed:5.1f} s, marginal {rates[name]:7.0f} images/s")
    plain, beam_rate = rates.values()
    print(f"Beam / in-process marginal throughput: {beam_rate / plain:.2f}")


if __name__ == "__main__":
    main()
