"""Training examples on disk (`ordered_vqvae.examples`) and the training stream over them."""

import os

import numpy as np
import pytest

from ordered_vqvae.examples import ExampleFile, write_examples
from ordered_vqvae.fit import TrainingData


def _batches(data, size):
    return (data[i:i + size] for i in range(0, len(data), size))


def test_rows_read_back_exactly_and_numpy_reads_the_file(tmp_path):
    data = np.random.default_rng(0).random((103, 4, 3, 2)).astype(np.float32)
    path = str(tmp_path / "x.npy")
    examples = write_examples(path, _batches(data, 10), np.float32)
    assert len(examples) == 103 and examples.shape == (103, 4, 3, 2)
    np.testing.assert_array_equal(np.load(path), data)  # NumPy's own format.
    picked = [5, 0, 102, 5, 77]
    np.testing.assert_array_equal(examples.read(picked), data[picked])
    assert examples.read([]).shape == (0, 4, 3, 2)
    with pytest.raises(IndexError, match="rows 0..103"):
        examples.read([0, 103])
    limited = write_examples(str(tmp_path / "y.npy"), _batches(data, 10), np.float32, limit=25)
    np.testing.assert_array_equal(limited.read(range(25)), data[:25])


def test_bad_input_leaves_no_file_and_a_truncated_file_is_named(tmp_path):
    path = str(tmp_path / "x.npy")
    with pytest.raises(ValueError, match=r"shape \(3,\), expected \(2,\)"):
        write_examples(path, [np.zeros((4, 2)), np.zeros((4, 3))], np.int32)
    with pytest.raises(ValueError, match="no examples"):
        write_examples(path, [], np.int32)
    assert os.listdir(tmp_path) == []
    write_examples(path, [np.arange(20).reshape(10, 2)], np.int32)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 3)
    with pytest.raises(ValueError, match="x.npy.*truncated"):
        ExampleFile(path)


def test_the_stream_over_a_file_gives_the_batches_of_the_same_examples_in_memory(tmp_path):
    codes = np.random.default_rng(1).integers(0, 50, size=(70, 6)).astype(np.int32)
    on_disk = write_examples(str(tmp_path / "c.npy"), _batches(codes, 16), np.int32)
    memory = TrainingData(codes, batch_size=8, seed=3)
    disk = TrainingData(on_disk, batch_size=8, seed=3)
    a = list(memory.dataset(0, 2, skip=3).as_numpy_iterator())
    b = list(disk.dataset(0, 2, skip=3).as_numpy_iterator())
    assert len(a) == len(b) == 2 * (70 // 8) - 3
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # Each epoch is a permutation: its batches hold distinct rows.
    epoch = np.concatenate(b[:70 // 8 - 3])
    assert len({row.tobytes() for row in epoch}) == len(epoch)
