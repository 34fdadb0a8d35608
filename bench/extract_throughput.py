"""Code extraction throughput: the Beam job against the same work done in-process.

Both read the same MNIST test images (10,000 by default), encode them in batches of 256
with the MNIST-preset encoder and write TFRecords of code indices; the in-process baseline
does it in a plain loop. Prints images/second of each and their ratio, from one run.

  .venv/bin/python bench/extract_throughput.py --mnist=../shared/data/mnist [--workers=2]
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

from ordered_vqvae import configs, data, models
from pipeline import extract, schema
from pipeline.config import DataConfig


def in_process(autoencoder_dir, mnist, out_dir, limit, batch_size=256):
    model = models.load_autoencoder(autoencoder_dir)
    encode = tf.function(model.encode, input_signature=[
        tf.TensorSpec((None,) + model.image_shape, tf.float32)])
    ds, _ = data.load("mnist", "test", path=mnist)
    os.makedirs(out_dir)
    with tf.io.TFRecordWriter(os.path.join(out_dir, "test.tfrecord")) as writer:
        for batch in ds.take(limit).batch(batch_size).as_numpy_iterator():
            codes = encode(batch["image"]).numpy()
            for record_id, label, row in zip(batch["id"], batch["label"], codes):
                writer.write(schema.serialize_example(record_id.decode(), label, row, "test"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", required=True, help="directory of the MNIST IDX files")
    parser.add_argument("--limit", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1, help="Beam worker processes (FnApiRunner)")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp()
    model = models.OrderedVQVAE(configs.preset("mnist"))
    model(tf.zeros((1, 28, 28, 1)))
    ae = models.save_autoencoder(model, os.path.join(tmp, "ae"))

    start = time.perf_counter()
    in_process(ae, args.mnist, os.path.join(tmp, "plain"), args.limit)
    plain = args.limit / (time.perf_counter() - start)

    beam_args = []
    if args.workers > 1:
        beam_args = [f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"]
    start = time.perf_counter()
    meta = extract.run(ae, os.path.join(tmp, "beam"), DataConfig("mnist", path=args.mnist,
                                                                         max_test=args.limit),
                       splits=["test"], beam_args=beam_args)
    beam_rate = args.limit / (time.perf_counter() - start)
    assert meta["counts"]["test"] == args.limit, meta["counts"]
    print(f"in-process encode + write: {plain:8.0f} images/s")
    print(f"Beam job ({'FnApiRunner' if args.workers == 1 else f'{args.workers} processes'}): "
          f"{beam_rate:8.0f} images/s")
    print(f"ratio Beam / in-process: {beam_rate / plain:.2f}")


if __name__ == "__main__":
    main()
