import numpy as np
import pytest

from tfkd import models


def trainable_params(model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


# Published parameter counts (millions) of the CIFAR variants, with the number of classes of
# the table they come from: He et al. 2016 (CIFAR-10) for the plain ResNets, the RepDistiller
# benchmark (CIFAR-100) for the x4 ResNets and the wide ResNets. Batch-norm running statistics
# are buffers, not parameters, in those counts.
PUBLISHED = [
    ("resnet20", 10, "0.27"), ("resnet56", 10, "0.86"), ("resnet110", 10, "1.7"),
    ("resnet32x4", 100, "7.43"), ("resnet8x4", 100, "1.23"),
    ("wrn_40_2", 100, "2.2"), ("wrn_16_2", 100, "0.70"),
]


@pytest.mark.parametrize("name,classes,published", PUBLISHED)
def test_parameter_count_matches_published(name, classes, published):
    count = trainable_params(models.get(name, classes)) / 1e6
    unit = 10.0 ** -len(published.split(".")[1])  # one unit of the last printed digit
    assert abs(count - float(published)) < unit, f"{name}: {count:.4f}M vs published {published}M"


@pytest.mark.parametrize("name", models.names())
def test_every_model_gives_logits_and_stage_features(name):
    side = 96 if name in models.IMAGENET_STRIDES else 32
    model = models.get(name, 7, (side, side, 3))
    out = model(np.zeros((2, side, side, 3), np.float32), training=False)
    assert tuple(out["logits"].shape) == (2, 7)
    shapes = [tuple(f.shape) for f in out["features"]]
    assert len(shapes) >= 3
    sizes = [s[1] for s in shapes]
    assert sizes == sorted(sizes, reverse=True), "stages go from shallow (large) to deep (small)"
    if name in models.IMAGENET_STRIDES:
        assert sizes == [48, 24, 12, 6, 3]
    else:
        assert sizes[0] == 32 and sizes[-1] in (4, 8)
    # the last stage feeds the head: its channels are the dense layer's inputs
    assert shapes[-1][-1] == model.get_layer("logits").kernel.shape[0]


def test_cifar_resnet_stage_shapes():
    out = models.get("resnet20", 10)(np.zeros((1, 32, 32, 3), np.float32))
    assert [tuple(f.shape) for f in out["features"]] == [(1, 32, 32, 16), (1, 16, 16, 32), (1, 8, 8, 64)]


def test_unknown_model_names_the_known_ones():
    with pytest.raises(KeyError, match="resnet20"):
        models.get("resnet21", 10)


def test_efficientnet_lite0_matches_its_published_size_and_keras_hubs_architecture():
    """EfficientNet-Lite0 with the 1000-class ImageNet head: 4.7M parameters published by its
    authors, 4,652,008 in KerasHub's efficientnet_lite0_ra_imagenet preset; KerasHub's own
    backbone built with the lite0 settings of its timm converter has the same body."""
    import keras_hub
    from keras_hub.src.utils.timm import convert_efficientnet

    ours = models.get("efficientnet_lite0", 1000, (224, 224, 3))
    assert trainable_params(ours) == 4_652_008  # batch-norm moving statistics are buffers
    assert abs(trainable_params(ours) / 1e6 - 4.7) < 0.05
    settings = convert_efficientnet.convert_backbone_config({"architecture": "efficientnet_lite0"})
    theirs = keras_hub.models.EfficientNetBackbone(**settings, input_shape=(224, 224, 3))
    assert ours.count_params() - (1280 * 1000 + 1000) == theirs.count_params()
    assert [tuple(w.shape) for w in ours.weights][:-2] == [tuple(w.shape) for w in theirs.weights]
    relus = [l for l in ours.layers if type(l).__name__ == "ReLU"]
    assert relus and all(float(l.max_value) == 6.0 for l in relus), "ReLU6 throughout"
    assert not [l for l in ours.layers if type(l).__name__ in ("Multiply", "GlobalAveragePooling2D")
                and l.name != "pool"], "no squeeze-and-excitation"


@pytest.mark.parametrize("name,published", [("MobileNetV3SmallMinimalistic", "2.0"),
                                            ("MobileNetV3LargeMinimalistic", "3.9")])
def test_minimalistic_mobilenetv3_students_match_their_published_size(name, published):
    """The minimalistic MobileNetV3s (Howard et al. 2019; no squeeze-and-excitation, no
    hard-swish, 3x3 kernels): Keras's table gives 2.0M (Small) and 3.9M (Large) parameters with
    the ImageNet top. Ours is the same body with a new head; the body's hard-swish and SE are gone."""
    import keras

    base = name.replace("Minimalistic", "")
    full = getattr(keras.applications, base)(weights=None, minimalistic=True, include_top=True)
    assert abs(trainable_params(full) / 1e6 - float(published)) < 0.05
    student = models.get(f"keras:{name}", 10, (96, 96, 3))
    body = getattr(keras.applications, base)(weights=None, minimalistic=True, include_top=False,
                                             input_shape=(96, 96, 3))
    channels = student.get_layer("logits").kernel.shape[0]
    assert student.count_params() == body.count_params() + channels * 10 + 10
    multiplies = [l.name for l in student.get_layer(name.lower()).layers if type(l).__name__ == "Multiply"]
    assert multiplies == [], "hard-swish and squeeze-and-excitation are Multiply layers in Keras"
    full_kind = models.get(f"keras:{base}", 10, (96, 96, 3)).get_layer(base.lower())
    assert [l for l in full_kind.layers if type(l).__name__ == "Multiply"], "the check can fail"


def test_offline_imagenet_weights_name_the_option_and_the_file_to_place(monkeypatch, tmp_path):
    """No network: the error names the key, the file Keras looks for and the folder to put it in,
    and the pipeline asks before any data is decoded (nothing is written in the run folder)."""
    from keras.src.utils import file_utils

    from tfkd import train
    from tfkd.errors import ModelError
    from tfkd.models.applications import check_weights

    def offline(fname=None, origin=None, *args, **kwargs):
        raise Exception(f"URL fetch failure on {origin}")

    monkeypatch.setattr(file_utils, "get_file", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    with pytest.raises(ModelError, match=r"option 'student.weights' = 'imagenet': keras:MobileNetV3Small: its "
                                         r"ImageNet weights are not in Keras's cache .* place (\S+\.h5) \(from "):
        check_weights("student.weights", "keras:MobileNetV3Small", "imagenet", (96, 96, 3))
    check_weights("student.weights", "keras:MobileNetV3Small", None, (96, 96, 3))  # no weights: nothing to fetch
    check_weights("student.weights", "resnet8", "imagenet", (32, 32, 3))  # not a keras: network (config refuses it)
    run = tmp_path / "run"
    code = train.main(["--stage", "distill", "--method", "student", "--student-model", "keras:MobileNetV2",
                       "--set", "student.weights=imagenet", "--run-dir", str(run), "--epochs", "1"])
    assert code == 4 and not run.exists()
