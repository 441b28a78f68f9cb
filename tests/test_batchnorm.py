"""tfkd.models.batchnorm (precise batch norm) and tfkd.health: a trained model is a working model."""

import json

import keras
import numpy as np
import pytest

from tfkd import health
from tfkd.models import batchnorm


def _dense_bn_model():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, name="dense")(inputs)
    normalized = keras.layers.BatchNormalization(momentum=0.99, name="bn")(hidden)
    frozen = keras.layers.BatchNormalization(name="frozen")
    frozen.trainable = False
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(frozen(normalized)))


def test_recalibrate_sets_the_statistics_of_every_image_against_numpy():
    keras.utils.set_random_seed(1)
    model = _dense_bn_model()
    rng = np.random.default_rng(0)
    images = (rng.normal(3.0, 2.0, (70, 6))).astype(np.float32)
    kernel, bias = (np.asarray(w) for w in model.get_layer("dense").weights)
    frozen_before = [np.asarray(w).copy() for w in model.get_layer("frozen").weights]
    momentum = model.get_layer("bn").momentum
    batches = list(batchnorm.image_batches(images, 32, lambda x: x))
    assert [len(b) for b in batches] == [32, 32], "a last batch under half the size is dropped"
    assert batchnorm.recalibrate(model, batches) == 1, "the frozen layer is not counted"
    hidden = images[:64].astype(np.float64) @ kernel + bias
    bn = model.get_layer("bn")
    np.testing.assert_allclose(np.asarray(bn.moving_mean), hidden.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.moving_variance), hidden.var(0), rtol=1e-4, atol=1e-5)
    assert bn.momentum == momentum, "the momentum is restored"
    for after, before in zip(model.get_layer("frozen").weights, frozen_before):
        np.testing.assert_array_equal(np.asarray(after), before)


def test_recalibrate_without_batches_changes_nothing():
    model = _dense_bn_model()
    before = [np.asarray(w).copy() for w in model.weights]
    assert batchnorm.recalibrate(model, []) == 0
    for after, was in zip(model.weights, before):
        np.testing.assert_array_equal(np.asarray(after), was)


def test_recalibrate_under_two_replicas_matches_one_device(two_replicas):
    rng = np.random.default_rng(2)
    images = rng.normal(0.0, 1.0, (64, 6)).astype(np.float32)
    keras.utils.set_random_seed(3)
    single = _dense_bn_model()
    weights = single.get_weights()
    batchnorm.recalibrate(single, batchnorm.image_batches(images, 32, lambda x: x))
    with two_replicas.scope():
        mirrored = _dense_bn_model()
        mirrored.set_weights(weights)
        batchnorm.recalibrate(mirrored, batchnorm.image_batches(images, 32, lambda x: x))
    for a, b in zip(single.get_layer("bn").weights, mirrored.get_layer("bn").weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("top1,labels,train,expected", [
    (0.097, [0] * 10 + list(range(10)) * 9, 0.78, "near chance"),
    (0.54, [0, 1] * 50, None, "near chance"),          # two classes: chance is 50%
    (0.70, [0, 1] * 50, None, None),
    (0.30, list(range(10)) * 10, 0.90, "far below"),
    (0.70, list(range(10)) * 10, 1.00, None),          # overfitting is not a broken model
    (0.15, list(range(10)) * 10, 0.16, "near chance"),
    (None, list(range(10)) * 10, 0.9, None),
])
def test_accuracy_warnings(top1, labels, train, expected):
    found = health.accuracy_warnings("the student", top1, labels, "validation", train)
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0] and "the student" in found[0]


@pytest.mark.slow
def test_a_mobilenetv3_trained_a_few_hundred_steps_works_after_the_stage(tmp_path, capsys):
    """The issue-34 command: 120 steps of a keras:MobileNetV3Small from random weights. Its
    moving averages leave it at chance (9.7% validation, 78% training); after the stage's
    precise batch norm it is far above chance, and the run says what changed."""
    from tfkd import train

    run_dir = tmp_path / "run"
    code = train.main(["--stage", "distill", "--method", "student", "--student-model",
                       "keras:MobileNetV3Small", "--dataset", "digits", "--epochs", "3",
                       "--batch-size", "32", "--run-dir", str(run_dir), "--set", "progress=0"])
    assert code == 0
    out = capsys.readouterr().out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val_accuracy"] > 0.6 and metrics["test_accuracy"] > 0.6
    record = metrics["precise_bn"]
    assert record["layers"] == 34 and record["images"] == 1293
    assert record["val_accuracy_before"] < 0.2, "without it the student sits at chance"
    assert "precise batch norm: 34 layers of the student" in out
    assert metrics["warnings"] == [] and "WARNING" not in out

    again = tmp_path / "off"
    code = train.main(["--stage", "distill", "--method", "student", "--student-model",
                       "keras:MobileNetV3Small", "--dataset", "digits", "--epochs", "3",
                       "--batch-size", "32", "--run-dir", str(again), "--set", "progress=0",
                       "--set", "student.precise_bn.enabled=false"])
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("tfkd: WARNING: the student scores") and "near chance" in last
    assert json.loads((again / "metrics.json").read_text())["warnings"]
