"""Bring your own model: any functional Keras classifier as a teacher (taps), keras:NAME and
keras_hub:PRESET networks as teachers and students, the decoder at any size, and the whole path
at 224 px from a streamed folder to a full-integer export (issue 17)."""

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


def test_a_network_from_random_weights_gets_moving_statistics_that_keep_up():
    """MobileNetV3's batch norms ship with momentum 0.999: from scratch, a few epochs left their
    moving statistics near their start and validation at chance; tfkd caps it at Keras's 0.99."""
    scratch = models.get("keras:MobileNetV3Small", 10, (32, 32, 3))
    moments = {l.momentum for l in scratch.get_layer("mobilenetv3small").layers
               if isinstance(l, keras.layers.BatchNormalization)}
    assert moments == {0.99}
    saved = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(scratch))
    assert {l.momentum for l in saved.get_layer("mobilenetv3small").layers
            if isinstance(l, keras.layers.BatchNormalization)} == {0.99}
    efficient = models.get("keras:EfficientNetV2B0", 10, (32, 32, 3))  # 0.9 already: unchanged
    assert {l.momentum for l in efficient.get_layer("efficientnetv2b0").layers
            if isinstance(l, keras.layers.BatchNormalization)} == {0.9}


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


def test_a_wide_feature_map_is_projected_before_it_is_decoded():
    """MobileNetV2's 3x3x1280 map at 96 px: halving from 1280 channels would cost 1.33 G
    multiply-adds per image (24 times the network); projected to 256 first, about 70 M."""
    decoder = build_decoder((3, 3, 1280), (96, 96, 3))
    widths = [layer.filters for layer in decoder.layers if isinstance(layer, keras.layers.Conv2D)]
    assert widths == [256, 128, 64, 32, 16, 16, 3] and decoder.get_layer("project_conv").kernel_size == (1, 1)
    import tensorflow as tf

    graph = tf.function(lambda x: decoder(x)).get_concrete_function(tf.TensorSpec((1, 3, 3, 1280))).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    multiply_adds = tf.compat.v1.profiler.profile(graph, options=options).total_float_ops / 2
    assert 60e6 < multiply_adds < 90e6, multiply_adds
    assert [l.filters for l in build_decoder((8, 8, 64), (32, 32, 3)).layers
            if isinstance(l, keras.layers.Conv2D)] == [32, 16, 3]  # CIFAR ResNets: unchanged


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


# ----------------------------------------------------------------------- KerasHub presets
def _hub_preset(folder, classes=3):
    """A small KerasHub ResNet image classifier saved as a local preset (with ImageNet-style
    rescaling in its image converter), and the classifier."""
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 32, 32],
        stackwise_num_blocks=[1, 1, 1], stackwise_num_strides=[1, 2, 2], block_type="basic_block",
        image_shape=(None, None, 3))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    converter = keras_hub.layers.ResNetImageConverter(image_size=(64, 64), scale=list(1 / (255 * std)),
                                                      offset=list(-mean / std))
    classifier = keras_hub.models.ResNetImageClassifier(
        backbone=backbone, num_classes=classes,
        preprocessor=keras_hub.models.ResNetImageClassifierPreprocessor(image_converter=converter))
    classifier.save_to_preset(str(folder))
    return classifier


def test_a_keras_hub_preset_is_a_teacher_or_student_with_its_own_weights_and_rescaling(tmp_path):
    import keras_hub

    classifier = _hub_preset(tmp_path / "preset")
    name = f"keras_hub:{tmp_path / 'preset'}"
    ours = models.get(name, 3, (64, 64, 3))
    # the preset's backbone and a dense head: what KerasHub's own classifier counts
    assert ours.count_params() == classifier.count_params()
    assert [tuple(f.shape[1:]) for f in ours.output["features"]] == [(32, 32, 64), (16, 16, 64), (8, 8, 32), (4, 4, 32)]
    assert ours.name == "keras_hub_preset"
    pretrained = models.get(name, 3, (64, 64, 3), weights="preset")
    for got, expected in zip(pretrained.get_layer("keras_hub_preset_body").get_weights(),
                             classifier.backbone.get_weights()):
        np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(ours.get_layer("keras_hub_preset_body").get_weights()[0],
                              classifier.backbone.get_weights()[0])  # unset: random weights
    # the feed layer maps the run's normalization onto the converter's scale and offset
    mean, std = [120.0] * 3, [60.0] * 3
    fed = models.get(name, 3, (64, 64, 3), normalization=(mean, std)).get_layer("feed")
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    converter = keras_hub.layers.ImageConverter.from_preset(str(tmp_path / "preset"))
    expected = pixels * np.array(converter.scale, np.float32) + np.array(converter.offset, np.float32)
    np.testing.assert_allclose(np_(fed((pixels - 120.0) / 60.0)), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelError, match="no_such_preset_here is not a KerasHub preset folder"):
        models.get(f"keras_hub:{tmp_path / 'no_such_preset_here'}", 3, (64, 64, 3))
    with pytest.raises(ModelError, match="keras_hub:resnet_9000_imagenet: not a KerasHub preset name"):
        models.get("keras_hub:resnet_9000_imagenet", 3, (64, 64, 3))


def test_a_users_keras_hub_classifier_teaches_at_the_runs_size(tmp_path, capsys):
    """A KerasHub task keeps its rescaling in a separate preprocessor and takes any image size:
    the teacher is fed what the converter makes of the pixels and tapped at the run's size."""
    from test_data import _photo_folder

    from tfkd import data
    from tfkd.pipeline import load_teacher

    classifier = _hub_preset(tmp_path / "preset")
    classifier.save(tmp_path / "hub.keras")
    prepared = data.prepare(f"folder:{_photo_folder(tmp_path / 'photos')}", image_size=72)
    teacher = load_teacher(tmp_path / "hub.keras", prepared)
    out = capsys.readouterr().out
    assert "takes images of any size: reading it at this run's 72x72" in out
    assert "feeding it what the image converter of" in out and "scale [0.017125" in out
    assert "taps inside res_net_backbone" in out
    x = prepared.normalize(prepared.pixels("test")[0]).numpy()
    pixels = x * prepared.std + prepared.mean
    converter = classifier.preprocessor.image_converter
    expected = np_(classifier(pixels * np.array(converter.scale, np.float32) + np.array(converter.offset, np.float32)))
    np.testing.assert_allclose(np_(teacher(x)["logits"]), expected, rtol=1e-4, atol=1e-4)
    assert [tuple(f.shape[1:3]) for f in teacher.output["features"]] == [(36, 36), (18, 18), (9, 9), (5, 5)]


def test_a_free_size_user_model_is_tapped_at_the_runs_size():
    base = keras.applications.MobileNetV3Small(include_top=False, weights=None, include_preprocessing=True)
    images = keras.Input((None, None, 3))
    scores = keras.layers.Dense(4, activation="softmax")(keras.layers.GlobalAveragePooling2D()(base(images)))
    user = keras.Model(images, scores)
    sized = taps.at_size(user, 96, 96)
    assert sized.input_shape == (None, 96, 96, 3) and taps.at_size(sized, 96, 96) is sized
    tapped, how = taps.tap(sized)
    assert [tuple(f.shape[1:3]) for f in tapped.output["features"]] == [(48, 48), (24, 24), (12, 12), (6, 6), (3, 3)]
    x = np.random.default_rng(0).uniform(0, 255, (2, 96, 96, 3)).astype("float32")
    np.testing.assert_allclose(np_(keras.ops.softmax(tapped(x)["logits"])), np_(user(x)), atol=1e-6)


def test_a_frozen_student_body_keeps_its_weights_while_its_head_learns():
    from tfkd.distill import from_config

    keras.utils.set_random_seed(0)
    cfg = config_lib.load(dotlist=["distill.method=kd"])
    teacher = models.get("resnet8", 10)
    student = models.get("keras:MobileNetV3Small", 10, (32, 32, 3))
    distiller = from_config(cfg.distill, student, [teacher], steps_per_epoch=4)
    frozen = keras.optimizers.SGD(0.0, momentum=0.9)  # what student.freeze_epochs gives in those epochs
    distiller.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), backbone_optimizer=frozen)
    distiller.build_all()
    (_, head), (_, body) = distiller.variable_groups()
    assert {v.path for v in student.get_layer("logits").trainable_variables} <= {v.path for v in head}
    assert len(body) == len(student.trainable_variables) - 2
    before = {v.path: v.numpy().copy() for v in student.trainable_variables}
    rng = np.random.default_rng(0)
    distiller.train_on_batch(rng.normal(size=(16, 32, 32, 3)).astype("float32"), rng.integers(0, 10, 16))
    changed = {v.path for v in student.trainable_variables if not np.array_equal(v.numpy(), before[v.path])}
    assert changed == {v.path for v in student.get_layer("logits").trainable_variables}
