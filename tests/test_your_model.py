"""Bring your own model: any functional Keras classifier as a teacher (taps), keras:NAME
networks as teachers and students, the decoder at any size (issue 17, parts 1 and 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tfkd import config as config_lib
from tfkd import models
from tfkd.errors import ConfigError, ModelError
from tfkd.models import taps
from tfkd.teacher import ReconstructionTeacher, build_decoder

pytestmark = pytest.mark.xdist_group("your_model")


def np_(x):
    return keras.ops.convert_to_numpy(x)


# ----------------------------------------------------------------------- keras: networks
# Networks whose keras.applications top is exactly global pooling (+ dropout) + a dense layer:
# ours with 1000 classes must count what Keras's own does, and what the Keras docs publish.
SAME_TOP = {"MobileNetV2": 3_538_984, "ResNet50V2": 25_613_800, "EfficientNetB0": 5_330_571,
            "EfficientNetV2B0": 7_200_312}


@pytest.mark.parametrize("name", sorted(SAME_TOP))
def test_keras_networks_count_what_keras_and_its_docs_count(name):
    # (the counts do not depend on the input size; 96 px builds faster than 224)
    ours = models.get(f"keras:{name}", 1000, (96, 96, 3))
    theirs = getattr(keras.applications, name)(weights=None, classes=1000, input_shape=(96, 96, 3))
    assert ours.count_params() == theirs.count_params() == SAME_TOP[name]


@pytest.mark.parametrize("name", ["MobileNetV3Small", "MobileNetV3Large", "ConvNeXtTiny"])
def test_keras_networks_with_another_top_count_the_body_plus_a_dense_head(name):
    ours = models.get(f"keras:{name}", 10, (64, 64, 3))
    body = getattr(keras.applications, name)(include_top=False, weights=None, input_shape=(64, 64, 3))
    channels = int(body.output.shape[-1])
    assert ours.count_params() == body.count_params() + channels * 10 + 10
    assert ours.name == f"keras_{name}" and ours.get_layer("logits").units == 10


def test_mobilenetv3_small_taps_one_map_per_resolution_with_no_extra_work():
    student = models.get("keras:MobileNetV3Small", 5, (224, 224, 3))
    shapes = [tuple(f.shape[1:]) for f in student.output["features"]]
    assert shapes == [(112, 112, 16), (56, 56, 72), (28, 28, 96), (14, 14, 288), (7, 7, 576)]
    # the taps are tensors the network computes anyway: the body holds exactly Keras's layers
    body = student.get_layer("mobilenetv3small")
    reference = keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(224, 224, 3))
    assert [type(layer).__name__ for layer in body.layers] == [type(layer).__name__ for layer in reference.layers]
    assert student.count_params() == reference.count_params() + 576 * 5 + 5  # the taps add no weights


def test_the_feed_layer_gives_each_network_its_own_input_convention():
    mean, std = [125.3, 123.0, 113.9], [63.0, 62.1, 66.7]
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    normalized = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    for name, expected in (("MobileNetV3Small", x), ("MobileNetV2", x / 127.5 - 1)):
        model = models.get(f"keras:{name}", 10, (32, 32, 3), normalization=(mean, std))
        fed = np_(model.get_layer("feed")(normalized))
        np.testing.assert_allclose(fed, expected, rtol=1e-5, atol=1e-3)


def test_a_keras_student_saves_and_loads_in_safe_mode(tmp_path):
    student = models.get("keras:MobileNetV3Small", 10, (32, 32, 3), normalization=([120.0] * 3, [60.0] * 3))
    student.save(tmp_path / "s.keras")
    loaded = keras.saving.load_model(tmp_path / "s.keras", safe_mode=True)
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(np_(student(x)["logits"]), np_(loaded(x)["logits"]))


# ----------------------------------------------------------------------- taps on user models
def _user_classifier(head: str = "dense_softmax", size: int = 32):
    """A user's classifier: Rescaling to [-1, 1], a keras.applications backbone called as a layer,
    pooling and a head whose output is ``head``."""
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(size, size, 3), alpha=0.35)
    images = keras.Input((size, size, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(base(keras.layers.Rescaling(1 / 127.5, -1)(images)))
    if head == "dense_softmax":
        out = keras.layers.Dense(10, activation="softmax")(pooled)
    elif head == "softmax_layer":
        out = keras.layers.Softmax()(keras.layers.Dense(10, name="scores")(pooled))
    elif head == "sigmoid":
        out = keras.layers.Dense(10, activation="sigmoid")(pooled)
    else:
        out = keras.layers.Dense(10, name="scores")(pooled)
    return keras.Model(images, out), base


@pytest.mark.parametrize("head", ["dense_softmax", "softmax_layer", "logits"])
def test_taps_read_logits_from_any_head(head):
    model, _ = _user_classifier(head)
    tapped, how = taps.tap(model)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    logits, scores = np_(tapped(x)["logits"]), np_(model(x))
    if head == "logits":
        np.testing.assert_array_equal(logits, scores)
        assert "no activation" in how
    else:  # softmax of the logits gives back the model's probabilities
        np.testing.assert_allclose(np_(keras.ops.softmax(logits)), scores, atol=1e-6)
        assert "softmax" in how
    if head == "softmax_layer":  # the softmax's input itself, not log(p)
        dense = model.get_layer("scores")
        inner = keras.Model(model.input, dense.output)
        np.testing.assert_array_equal(logits, np_(inner(x)))
    assert tapped.count_params() == model.count_params()


def test_taps_open_a_nested_backbone_and_match_its_own_layers():
    model, base = _user_classifier()
    tapped, how = taps.tap(model)
    assert f"inside {base.name}" in how
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    features = tapped(x)["features"]
    assert [tuple(f.shape[1:3]) for f in features] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    # the deepest tap is the backbone's output on the rescaled images
    np.testing.assert_allclose(np_(features[-1]), np_(base(x / 127.5 - 1)), rtol=1e-5, atol=1e-5)


def test_named_taps_and_their_errors():
    model, _ = _user_classifier()
    tapped, how = taps.tap(model, ["block_3_expand_relu", "out_relu"])
    assert [tuple(f.shape[1:3]) for f in tapped.output["features"]] == [(8, 8), (1, 1)]
    assert tapped.output["features"][-1].shape[-1] == 1280 and "named" in how
    with pytest.raises(ModelError, match=r"has no layer 'block_3_relu'.*similar: block_3"):
        taps.tap(model, ["block_3_relu"])
    dense = model.layers[-1].name  # dense, dense_3, ...: Keras numbers names within a process
    with pytest.raises(ModelError, match="not a feature map"):
        taps.tap(model, [dense])


def test_a_sigmoid_head_and_a_subclassed_model_are_refused_clearly():
    model, _ = _user_classifier("sigmoid")
    with pytest.raises(ModelError, match="sigmoid"):
        taps.tap(model)

    class Mine(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(4, 3)
            self.head = keras.layers.Dense(10)

        def call(self, x):
            return self.head(keras.ops.mean(self.conv(x), axis=(1, 2)))

    mine = Mine()
    mine(np.zeros((1, 32, 32, 3), "float32"))
    with pytest.raises(ModelError, match="subclassed model with no layer graph.*functional"):
        taps.tap(mine)


def test_told_probabilities_on_a_logits_model_and_told_logits_on_a_softmax_model():
    model, _ = _user_classifier("dense_softmax")
    tapped, how = taps.tap(model, output="logits")  # the user says the scores are logits
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(np_(tapped(x)["logits"]), np_(model(x)))
    assert how.startswith("logits: told")


def test_the_decoder_reaches_any_input_size():
    for feature, image in (((4, 4, 32), (100, 100, 3)), ((7, 7, 64), (224, 224, 3)), ((3, 3, 8), (96, 96, 3))):
        decoder = build_decoder(feature, image)
        assert tuple(decoder.output.shape[1:]) == image
        assert ("to_image_size" in [layer.name for layer in decoder.layers]) == (feature[0] == 4)


def test_a_pretrained_networks_new_head_trains_with_the_decoder():
    backbone = models.get("keras:MobileNetV3Small", 10, (32, 32, 3))
    teacher = ReconstructionTeacher(backbone, head_layers=("logits",))
    teacher.compile(optimizer=keras.optimizers.SGD(0.1), backbone_optimizer=keras.optimizers.SGD(0.01))
    teacher(np.zeros((1, 32, 32, 3), "float32"))
    (main, main_vars), (_, pretrained) = teacher._variable_groups()
    head = {id(v) for v in backbone.get_layer("logits").trainable_variables}
    assert head <= {id(v) for v in main_vars} and not head & {id(v) for v in pretrained}
    assert len(pretrained) == len(backbone.trainable_variables) - 2
    assert ReconstructionTeacher.from_config(teacher.get_config()).head_layers == ["logits"]


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize("dotlist, match", [
    (["student.model=keras:MobileNetV9"], "student.model"),
    (["teacher.weights=imagenet"], "teacher.weights.*zoo model"),
    (["student.model=keras:MobileNetV2", "student.weights=/no/such.h5"], "existing weights file"),
    (["distill.teacher_output=scores"], "distill.teacher_output"),
    (["distill.teacher_input=0-256"], "distill.teacher_input"),
])
def test_bad_model_options_fail_in_validation(dotlist, match):
    with pytest.raises(ConfigError, match=match):
        config_lib.load(None, dotlist=dotlist)


# --------------------------------------------------------------------------- end to end
def test_a_users_softmax_classifier_teaches_a_keras_student_with_cft(tmp_path):
    """The issue's first command on digits: the user's .keras teacher (a backbone nested in it,
    a softmax head, Rescaling inside), a keras:MobileNetV3Small student, cft, then an export."""
    model, _ = _user_classifier()
    model.save(tmp_path / "my_model.keras")
    run_dir = tmp_path / "run"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-m", "tfkd.train", "--stage", "distill", "--method", "cft",
         "--teacher", str(tmp_path / "my_model.keras"), "--student-model", "keras:MobileNetV3Small",
         "--run-dir", str(run_dir), "--epochs", "1", "--batch-size", "64", "--set", "data.subset=0.15",
         "--set", "progress=0"], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "taps inside mobilenetv2_0.35_32" in out and "logits = log(p)" in out
    assert "starts with Rescaling" in out and "feeding it [0, 255] pixels" in out
    assert "not trained with reconstruction" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"] == "keras:MobileNetV3Small" and metrics["method"] == "cft"
    assert metrics["params"] == models.get("keras:MobileNetV3Small", 10, (32, 32, 3)).count_params()
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and np.isfinite(metrics["stages"]["distill"]["d_loss"])
    student = keras.saving.load_model(run_dir / "student.keras", safe_mode=True)
    assert student.name == "keras_MobileNetV3Small" and student.output["logits"].shape[-1] == 10
