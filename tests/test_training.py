"""Training: checkpoints and resume, two-stage recipe, NaN guard, logs; ordering on real MNIST."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from ordered_vqvae import configs, fit, models, training
from pipeline import sources
from pipeline.config import DataConfig

SMALL = configs.preset("digits", hidden=(16,), latent_channels=8, codebook_size=32,
                       batch_size=64, epochs=2)


@pytest.fixture(scope="module")
def digits():
    train = sources.to_numpy(sources.load("digits", "train")[0])[0]
    test = sources.to_numpy(sources.load("digits", "test")[0])[0]
    return train, test


def _weights(model):
    return [w.numpy() for w in model.weights]


def test_checkpoints_resume_and_logs(tmp_path, digits):
    train, test = digits
    workdir = str(tmp_path)
    model = training.train_autoencoder(SMALL.replace(epochs=1), train, test[:100], workdir,
                                       verbose=0)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps_per_epoch = len(train) // SMALL.batch_size  # Checkpoints are numbered by batches.
    assert tf.train.latest_checkpoint(ckpt_dir).endswith(f"ckpt-{steps_per_epoch}")
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        training.train_autoencoder(SMALL, train, None, workdir, verbose=0)

    resumed = training.train_autoencoder(SMALL.replace(epochs=3), train, test[:100], workdir,
                                         resume=True, verbose=0)
    assert tf.train.latest_checkpoint(ckpt_dir).endswith(f"ckpt-{3 * steps_per_epoch}")
    history = json.load(open(os.path.join(workdir, "history.json")))
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for h in history:
        assert {"loss", "recon", "perplexity", "usage", "val_mse_25pct", "val_mse_100pct"} <= set(h)
        assert 1.0 <= h["perplexity"] <= 32 and 0 < h["usage"] <= 1
    # The optimizer state was restored: its step counter went on from epoch 1 (else 2 epochs).
    assert int(resumed.optimizer.iterations) == 3 * steps_per_epoch
    events = [f for _, _, files in os.walk(os.path.join(workdir, "tensorboard")) for f in files]
    assert any(f.startswith("events.out.tfevents") for f in events)

    # Resuming a finished run changes nothing.
    before = _weights(resumed)
    again = training.train_autoencoder(SMALL.replace(epochs=3), train, None, workdir,
                                       resume=True, verbose=0)
    for a, b in zip(before, _weights(again)):
        np.testing.assert_array_equal(a, b)
    assert model.code_length == 8


def test_steps_per_execution_divides_epochs_resumes_and_checkpoints():
    assert fit.steps_per_execution(468, 0, 0) == 13  # MNIST: 60,000 images, batch 128.
    assert fit.steps_per_execution(22) == 11
    assert fit.steps_per_execution(468, 6, 0) == 6  # Resumed after batch 6.
    assert fit.steps_per_execution(468, 0, 4) == 4  # A checkpoint every 4 batches.
    assert fit.steps_per_execution(17) == 1
    assert fit.steps_per_execution(32) == 16


def test_several_steps_per_call_train_exactly_as_one(tmp_path, digits, monkeypatch):
    train, _ = digits
    config = SMALL.replace(epochs=2)
    assert fit.steps_per_execution(len(train) // config.batch_size) > 1
    many = training.train_autoencoder(config, train, None, str(tmp_path / "many"), verbose=0)
    monkeypatch.setattr(fit, "MAX_STEPS_PER_EXECUTION", 1)
    one = training.train_autoencoder(config, train, None, str(tmp_path / "one"), verbose=0)
    assert int(many.optimizer.iterations) == int(one.optimizer.iterations) == 2 * 22
    for a, b in zip(_weights(many), _weights(one)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_two_stage_recipe_runs_pretrain_then_ordered_finetune(tmp_path, digits):
    train, _ = digits
    config = SMALL.replace(pretrain_epochs=1, epochs=1, truncation="uniform")
    model = training.train_autoencoder(config, train, None, str(tmp_path), verbose=0)
    history = json.load(open(os.path.join(str(tmp_path), "history.json")))
    assert [h["stage"] for h in history] == ["pretrain", "ordered finetune"]
    assert model.truncation.distribution == "uniform"
    np.testing.assert_allclose(float(model.optimizer.learning_rate), config.finetune_learning_rate)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, digits, monkeypatch):
    train, _ = digits
    workdir = str(tmp_path)
    training.train_autoencoder(SMALL.replace(epochs=1), train, None, workdir, verbose=0)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    original = models.OrderedVQVAE._nested_loss

    def poisoned(self, x, training, lengths=None):  # The loss turns NaN from step 30 on.
        loss, recon, aux = original(self, x, training, lengths)
        poison = tf.where(self.optimizer.iterations >= 30, np.nan, 0.0)
        return loss + poison, recon, aux

    monkeypatch.setattr(models.OrderedVQVAE, "_nested_loss", poisoned)
    with pytest.raises(fit.TrainingDiverged,
                       match=r"loss became NaN or Inf at step 31 \(epoch 2, batch 9\).*ckpt-22"):
        training.train_autoencoder(SMALL.replace(epochs=2), train, None, workdir, resume=True,
                                   verbose=0)
    assert tf.train.latest_checkpoint(ckpt_dir).endswith("ckpt-22")  # 22 batches per epoch.


def test_bad_training_images_are_rejected(tmp_path, digits):
    train, _ = digits
    bad = train.copy()
    bad[7, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf at image index 7"):
        training.train_autoencoder(SMALL, bad, None, str(tmp_path), verbose=0)
    with pytest.raises(ValueError, match=r"values in \[0, 1\.875\], expected \[0, 1\] \(image index 0\)"):
        training.train_autoencoder(SMALL, train * 2, None, str(tmp_path), verbose=0)
    with pytest.raises(ValueError, match=r"shape \(10, 8, 8\), expected \[N, 8, 8, 1\]"):
        training.train_autoencoder(SMALL, train[:10, ..., 0], None, str(tmp_path), verbose=0)
    with pytest.raises(ValueError, match="at least batch_size=64"):
        training.train_autoencoder(SMALL, train[:10], None, str(tmp_path), verbose=0)


@pytest.mark.slow
def test_ordered_beats_unordered_at_short_codes_on_real_mnist(tmp_path, mnist_dir):
    """About 2 CPU minutes: the paper's central claim at small scale."""
    train = DataConfig("mnist", path=mnist_dir, max_train=30000).arrays("train")[0]
    test = sources.to_numpy(sources.load("mnist", "test", path=mnist_dir)[0], limit=2000)[0]
    lengths = sorted(configs.fraction_lengths(64).values())
    results = {}
    for truncation in ("uniform_per_example", "none"):
        config = configs.preset("mnist", truncation=truncation, epochs=3)
        model = training.train_autoencoder(config, train, None, str(tmp_path / truncation),
                                           verbose=0)
        results[truncation] = model.mse_by_length(test, lengths)
    ordered, unordered = results["uniform_per_example"], results["none"]
    print("test MSE at k =", lengths, "ordered", ordered, "unordered", unordered)
    values = [ordered[k] for k in lengths]
    assert all(b <= a * 1.02 for a, b in zip(values, values[1:])), values
    assert ordered[16] < 0.6 * unordered[16]


def test_keep_best_ends_with_the_best_epochs_weights_also_after_a_resume(tmp_path):
    import keras

    from ordered_vqvae.fit import Stage, TrainingData, fit_stages

    scores = {0: 3.0, 1: 1.0, 2: 2.0, 3: 5.0}  # Epoch 2 (index 1) is the best.
    seen = {}

    class Score(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["score"] = scores[epoch]
            seen[epoch + 1] = self.model.get_weights()

    def run(end, resume):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3)])
        stage = Stage("s", end, lambda progress: keras.optimizers.SGD(0.1),
                      lambda m, o, n: m.compile(optimizer=o, loss="mse", steps_per_execution=n))
        data = TrainingData(np.random.default_rng(0).random((32, 3)).astype(np.float32), 8,
                            transform=lambda x: (x, 2 * x))
        fit_stages(model, [stage], data, str(tmp_path / "w"), "t", resume=resume, verbose=0,
                   callbacks=[Score()], keep_best="score")
        return model

    run(3, resume=False)  # Killed, say, after epoch 3; resumed to 4 epochs.
    model = run(4, resume=True)
    assert sorted(seen) == [1, 2, 3, 4]
    for got, want in zip(model.get_weights(), seen[2]):
        np.testing.assert_array_equal(got, want)
    assert not np.allclose(seen[2][0], seen[4][0])  # The last epoch's weights differ.
