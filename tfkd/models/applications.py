"""Pretrained network families as tfkd models (teacher or student): ``keras:NAME`` and
``keras_hub:PRESET``.

``keras:NAME`` is a ``keras.applications`` network built without its top (``include_top=False``)
with the weights asked for (``none``, ``imagenet``, or a weights file of the top-less network).
``keras_hub:PRESET`` is the backbone of a KerasHub image classifier preset: a preset name
(downloaded by KerasHub on a connected machine) or a local preset folder (``save_to_preset``),
with its own weights (``weights=imagenet`` or ``preset``) or random ones (unset).

Either is tapped (``tfkd.models.taps``: the last layer at each resolution, or named layers) and
given a new head for the dataset's classes: global average pooling and a dense ``logits`` layer.
In front sits one ``feed`` layer that turns the run's normalized images into what the network
takes, read, never guessed: ``keras.applications`` networks differ (MobileNetV3, EfficientNet and
ConvNeXt rescale [0, 255] pixels inside; MobileNetV2, ResNetV2 and Xception take [-1, 1];
DenseNet ImageNet-normalized [0, 1]) and the table below says which; a KerasHub preset keeps its
rescaling in its preprocessor's image converter (``scale``/``offset``), which is read from the
preset.

The ``keras:`` names and conventions are plain data, so an option naming a network is checked
without importing Keras.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

PREFIX = "keras:"
HUB_PREFIX = "keras_hub:"
#: The layers ``build`` puts on top of the network that hold weights: new even when the network
#: is pretrained, so they train at the full rate (``ReconstructionTeacher.head_layers``).
HEAD_LAYERS = ("logits",)

#: keras.applications network -> the input convention it takes (``tfkd.models.wrap.NAMED``).
NETWORKS: dict[str, str] = {
    "MobileNet": "-1-1", "MobileNetV2": "-1-1",
    "MobileNetV3Small": "0-255", "MobileNetV3Large": "0-255",
    "MobileNetV3SmallMinimalistic": "0-255", "MobileNetV3LargeMinimalistic": "0-255",
    **{f"EfficientNetB{i}": "0-255" for i in range(8)},
    **{f"EfficientNetV2{v}": "0-255" for v in ("B0", "B1", "B2", "B3", "S", "M", "L")},
    **{f"ResNet{d}V2": "-1-1" for d in (50, 101, 152)},
    **{f"ConvNeXt{s}": "0-255" for s in ("Tiny", "Small", "Base", "Large", "XLarge")},
    **{f"DenseNet{d}": "imagenet" for d in (121, 169, 201)},
    "Xception": "-1-1", "InceptionV3": "-1-1", "InceptionResNetV2": "-1-1", "NASNetMobile": "-1-1",
}


#: Names for keras.applications networks built with options: the minimalistic MobileNetV3s
#: (no squeeze-and-excitation, no hard-swish, 3x3 kernels: the variants that quantize well).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "MobileNetV3SmallMinimalistic": ("MobileNetV3Small", {"minimalistic": True}),
    "MobileNetV3LargeMinimalistic": ("MobileNetV3Large", {"minimalistic": True}),
}


def is_application(name: str) -> bool:
    """True for ``keras:NAME`` with NAME a network of ``NETWORKS``, and for ``keras_hub:PRESET``
    (whether the preset exists is known when it is built)."""
    if name.startswith(HUB_PREFIX):
        return bool(name[len(HUB_PREFIX):].strip())
    return name.startswith(PREFIX) and name[len(PREFIX):] in NETWORKS


def network(name: str) -> str:
    """``keras:MobileNetV3Small`` -> ``MobileNetV3Small``; ``keras_hub:PRESET`` -> ``PRESET``."""
    return name[len(HUB_PREFIX):] if name.startswith(HUB_PREFIX) else name[len(PREFIX):]


def model_name(name: str) -> str:
    """The Keras model name of ``keras:NAME`` / ``keras_hub:PRESET`` (letters, digits and
    underscores only: it names variables and files)."""
    import re

    if name.startswith(HUB_PREFIX):
        preset = network(name).rstrip("/\\").replace("\\", "/").split("/")[-1]
        return "keras_hub_" + re.sub(r"[^A-Za-z0-9_]", "_", preset)
    return f"keras_{network(name)}"


def build(name: str, num_classes: int, input_shape: Sequence[int] = (224, 224, 3),
          weights: str | None = None, normalization: tuple[Sequence[float], Sequence[float]] | None = None,
          layers: Sequence[str] = (), api: ModuleType | None = None) -> Any:
    """The tfkd model of ``keras:NAME`` or ``keras_hub:PRESET``: ``{"logits", "features", "preact"}``.

    ``normalization``: the (mean, std) the run normalizes its images with; the feed layer maps
    them onto the network's convention (None: the inputs are already in it). ``weights``: None,
    ``imagenet`` (``preset`` too for KerasHub) or a file. ``layers``: the taps (default: the last
    layer at each resolution).
    """
    import keras

    from tfkd.errors import ModelError

    if api is not None and api is not keras:
        if name.startswith(HUB_PREFIX) or getattr(api, "__name__", "") != "tf_keras":
            raise ModelError(f"{name}: built with Keras 3 (keras: networks also with tf_keras), "
                             f"not {getattr(api, '__name__', api)}")
        return _legacy_logits_model(name, num_classes, input_shape, normalization, api)
    if name.startswith(HUB_PREFIX):
        base, convention = _hub_backbone(name, input_shape, weights)
        body = f"{model_name(name)}_body"
    else:
        base, convention = _application(name, input_shape, weights)
        body = network(name).lower()
    if weights is None:
        from_scratch_batch_norm(base)
    return with_head(base, convention, num_classes, input_shape, normalization, layers, model_name(name), body)


#: Batch-norm momentum of a network trained from random weights (Keras's own default).
SCRATCH_BN_MOMENTUM = 0.99


def from_scratch_batch_norm(network: Any) -> None:
    """Caps the batch-norm momentum of a network trained from random weights at
    ``SCRATCH_BN_MOMENTUM``: MobileNetV2/V3 ship 0.999, whose moving statistics need thousands of
    steps to describe the data, so a from-scratch run of a few epochs would evaluate at chance."""
    import keras

    for layer in network._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.momentum > SCRATCH_BN_MOMENTUM:
            layer.momentum = SCRATCH_BN_MOMENTUM


def _network_and_options(name: str) -> tuple[str, dict[str, Any]]:
    """The keras.applications function name of ``keras:NAME`` and the options it is built with
    (the networks that can keep their [0, 255] rescaling inside are asked to)."""
    from tfkd.errors import ModelError

    net = network(name)
    if net not in NETWORKS:
        raise ModelError(f"unknown network {name!r}; keras: networks: {', '.join(sorted(NETWORKS))}")
    kwargs: dict[str, Any] = {}
    if net.startswith(("MobileNetV3", "EfficientNetV2", "ConvNeXt")):
        kwargs["include_preprocessing"] = True
    if net in VARIANTS:
        net, options = VARIANTS[net]
        kwargs.update(options)
    return net, kwargs


def _application(name: str, input_shape: Sequence[int], weights: str | None) -> tuple[Any, Any]:
    """A top-less ``keras.applications`` network and the input convention it takes."""
    import keras

    from tfkd.errors import ModelError
    from tfkd.models import wrap

    from keras.src.utils import file_utils

    net, kwargs = _network_and_options(name)
    asked: list[tuple[str, str, str]] = []  # (file name, origin, cache folder) Keras looks for
    fetch = file_utils.get_file

    def recording(fname: Any = None, origin: Any = None, *args: Any, **options: Any) -> Any:
        asked.append((str(fname), str(origin), str(options.get("cache_subdir", "datasets"))))
        return fetch(fname, origin, *args, **options)

    file_utils.get_file = recording  # the applications call it by this module attribute
    try:
        base = getattr(keras.applications, net)(include_top=False, weights=weights,
                                                 input_shape=tuple(input_shape), **kwargs)
    except ValueError as error:  # Keras's own message: a too small input, a weights mismatch
        raise ModelError(f"{name} at {tuple(input_shape)} with weights {weights!r}: "
                         f"{str(error).splitlines()[0]}") from None
    except Exception as error:  # noqa: BLE001 - a download that cannot happen offline
        if weights == "imagenet":
            if asked:
                fname, origin, folder = asked[-1]
                home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
                raise ModelError(f"{name}: its ImageNet weights are not in Keras's cache and could not be "
                                 f"downloaded ({type(error).__name__}): place {fname} (from {origin}, "
                                 f"fetched on a connected machine) in {home / folder}, or give its path "
                                 "as the weights") from None
            raise ModelError(f"{name}: the ImageNet weights could not be downloaded ({type(error).__name__}): "
                             "on a machine without internet access, download them elsewhere and "
                             "pass the file as weights") from None
        raise
    finally:
        file_utils.get_file = fetch
    return base, wrap.named(NETWORKS[net], f"keras.applications.{net}")


def check_weights(key: str, name: str, weights: str | None, input_shape: Sequence[int]) -> None:
    """Makes sure the ImageNet weights of ``keras:`` network ``name`` are at hand (Keras's cache,
    or downloaded now) before any data is decoded; ``ModelError`` naming the option ``key`` and
    the file to place otherwise."""
    from tfkd.errors import ModelError

    if weights != "imagenet" or not name.startswith("keras:"):
        return
    try:
        _application(name, input_shape, weights)
    except ModelError as error:
        raise ModelError(f"option '{key}' = 'imagenet': {error}") from None


def hub_convention(preset: str) -> Any:
    """The input convention of a KerasHub preset, read from its image converter."""
    import keras_hub

    from tfkd.errors import ModelError
    from tfkd.models import wrap

    try:
        converter = keras_hub.layers.ImageConverter.from_preset(preset)
    except Exception as error:  # noqa: BLE001 - KerasHub raises several kinds for a missing file
        raise ModelError(f"keras_hub:{preset}: its preset has no image converter to read the input "
                         f"scaling from ({type(error).__name__}); tfkd reads it rather than guessing") from None
    return wrap.converter_convention(converter, f"keras_hub:{preset}")


def _hub_backbone(name: str, input_shape: Sequence[int], weights: str | None) -> tuple[Any, Any]:
    """A KerasHub preset's backbone at ``input_shape`` and the input convention it takes."""
    import keras_hub

    from tfkd.errors import ModelError

    preset = network(name).strip()
    pretrained = weights in ("imagenet", "preset")
    looks_like_folder = "/" in preset or "\\" in preset or preset.startswith(".")
    if looks_like_folder and not (Path(preset) / "config.json").is_file():
        raise ModelError(f"{name}: {preset} is not a KerasHub preset folder (no config.json; make one "
                         "with save_to_preset)")
    try:
        base = keras_hub.models.Backbone.from_preset(preset, load_weights=pretrained,
                                                     image_shape=tuple(input_shape))
    except (ValueError, TypeError) as error:
        if "Unknown preset identifier" in str(error):
            raise ModelError(f"{name}: not a KerasHub preset name (keras_hub.models.Backbone.presets "
                             "lists them) nor a preset folder") from None
        raise ModelError(f"{name} at {tuple(input_shape)}: {str(error).splitlines()[0]}") from None
    except Exception as error:  # noqa: BLE001 - a preset that cannot be downloaded offline
        raise ModelError(f"{name}: KerasHub could not load the preset ({type(error).__name__}): on a "
                         "machine without internet access, save it elsewhere with "
                         "keras_hub.models.ImageClassifier.from_preset(...).save_to_preset(FOLDER) "
                         "and pass keras_hub:FOLDER") from None
    if weights not in (None, "imagenet", "preset"):
        base.load_weights(weights)
    return base, hub_convention(preset)


def _legacy_logits_model(name: str, num_classes: int, input_shape: Sequence[int],
                         normalization: tuple[Sequence[float], Sequence[float]] | None, api: ModuleType) -> Any:
    """``keras:NAME`` built with tf_keras as one flat graph (``tfkd.compress``: TensorFlow Model
    Optimization wraps layers of a flat tf_keras model only) with the same layers, in the same
    order, as the Keras 3 model's: feed, network, pooling, logits. Output ``{"logits"}`` only (no
    taps: compress fine-tunes the logits); random weights, to be copied from the Keras 3 model."""
    from tfkd.models import wrap

    net, kwargs = _network_and_options(name)
    images = api.Input(tuple(input_shape), name="images")
    x = images
    if normalization is not None:
        feed = wrap.feed_layer(normalization[0], normalization[1], wrap.named(NETWORKS[net], net), api=api)
        x = feed(images)
    base = getattr(api.applications, net)(include_top=False, weights=None, input_tensor=x, **kwargs)
    pooled = api.layers.GlobalAveragePooling2D(name="pool")(base.output)
    logits = api.layers.Dense(num_classes, name="logits")(pooled)
    return api.Model(images, {"logits": logits}, name=model_name(name))


def with_head(base: Any, convention: Any, num_classes: int, input_shape: Sequence[int],
              normalization: tuple[Sequence[float], Sequence[float]] | None, layers: Sequence[str],
              name: str, body_name: str) -> Any:
    """A top-less network as a tfkd model ``name``: its taps (a model ``body_name``), a feed
    layer mapping the run's normalized images onto ``convention``, and a new head (pooling and
    a dense ``logits`` layer)."""
    import keras

    from tfkd.models import taps, wrap

    chosen = taps.named_taps(base, layers, "distill.student_layers/teacher_layers") if layers else taps.default_taps(base)
    body = keras.Model(base.input, {"features": [layer.output for layer in chosen],
                                    "preact": [taps.preactivation(layer) for layer in chosen]},
                       name=body_name)
    images = keras.Input(tuple(input_shape), name="images")
    x = images
    if normalization is not None:
        x = wrap.feed_layer(normalization[0], normalization[1], convention)(images)
    out = body(x)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(out["features"][-1])
    logits = keras.layers.Dense(num_classes, name="logits")(pooled)
    return keras.Model(images, {"logits": logits, "features": list(out["features"]),
                                "preact": list(out["preact"])}, name=name)
