"""``keras:NAME``: a ``keras.applications`` network as a tfkd model (teacher or student).

The network is built without its top (``include_top=False``) with the weights asked for
(``none``, ``imagenet``, or a weights file of the top-less network), tapped (``tfkd.models.taps``:
the last layer at each resolution, or named layers), and given a new head for the dataset's
classes: global average pooling and a dense ``logits`` layer. In front sits one ``feed`` layer
that turns the run's normalized images into what the network takes: ``keras.applications``
networks differ (MobileNetV3, EfficientNet and ConvNeXt rescale [0, 255] pixels inside;
MobileNetV2, ResNetV2 and Xception take [-1, 1]; DenseNet ImageNet-normalized [0, 1]), and the
table below says which, so nothing is guessed.

The names and conventions are plain data, so an option naming a network is checked without
importing Keras.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Sequence

PREFIX = "keras:"
#: The layers ``build`` puts on top of the network that hold weights: new even when the network
#: is pretrained, so they train at the full rate (``ReconstructionTeacher.head_layers``).
HEAD_LAYERS = ("logits",)

#: keras.applications network -> the input convention it takes (``tfkd.models.wrap.NAMED``).
NETWORKS: dict[str, str] = {
    "MobileNet": "-1-1", "MobileNetV2": "-1-1",
    "MobileNetV3Small": "0-255", "MobileNetV3Large": "0-255",
    **{f"EfficientNetB{i}": "0-255" for i in range(8)},
    **{f"EfficientNetV2{v}": "0-255" for v in ("B0", "B1", "B2", "B3", "S", "M", "L")},
    **{f"ResNet{d}V2": "-1-1" for d in (50, 101, 152)},
    **{f"ConvNeXt{s}": "0-255" for s in ("Tiny", "Small", "Base", "Large", "XLarge")},
    **{f"DenseNet{d}": "imagenet" for d in (121, 169, 201)},
    "Xception": "-1-1", "InceptionV3": "-1-1", "InceptionResNetV2": "-1-1", "NASNetMobile": "-1-1",
}


def is_application(name: str) -> bool:
    """True for ``keras:NAME`` with NAME a network of ``NETWORKS``."""
    return name.startswith(PREFIX) and name[len(PREFIX):] in NETWORKS


def network(name: str) -> str:
    """``keras:MobileNetV3Small`` -> ``MobileNetV3Small``."""
    return name[len(PREFIX):]


def model_name(name: str) -> str:
    """The Keras model name of ``keras:NAME`` (no colon: it names variables and files)."""
    return f"keras_{network(name)}"


def build(name: str, num_classes: int, input_shape: Sequence[int] = (224, 224, 3),
          weights: str | None = None, normalization: tuple[Sequence[float], Sequence[float]] | None = None,
          layers: Sequence[str] = (), api: ModuleType | None = None) -> Any:
    """The tfkd model of ``keras:NAME``: ``{"logits", "features", "preact"}``.

    ``normalization``: the (mean, std) the run normalizes its images with; the feed layer maps
    them onto the network's convention (None: the inputs are already in it). ``weights``: None,
    ``imagenet`` or a file. ``layers``: the taps (default: the last layer at each resolution).
    """
    import keras

    from tfkd.errors import ModelError
    from tfkd.models import taps, wrap

    if api is not None and api is not keras:
        raise ModelError(f"{name}: keras.applications networks are built with Keras 3 only")
    net = network(name)
    if net not in NETWORKS:
        raise ModelError(f"unknown network {name!r}; keras: networks: {', '.join(sorted(NETWORKS))}")
    kwargs: dict[str, Any] = {}
    if net.startswith(("MobileNetV3", "EfficientNetV2", "ConvNeXt")):
        kwargs["include_preprocessing"] = True
    try:
        base = getattr(keras.applications, net)(include_top=False, weights=weights,
                                                 input_shape=tuple(input_shape), **kwargs)
    except ValueError as error:  # Keras's own message: a too small input, a weights mismatch
        raise ModelError(f"{name} at {tuple(input_shape)} with weights {weights!r}: "
                         f"{str(error).splitlines()[0]}") from None
    except Exception as error:  # noqa: BLE001 - a download that cannot happen offline
        if weights == "imagenet":
            raise ModelError(f"{name}: the ImageNet weights could not be downloaded ({type(error).__name__}): "
                             "on a machine without internet access, download them elsewhere and "
                             "pass the file as weights") from None
        raise
    chosen = taps.named_taps(base, layers, "distill.student_layers/teacher_layers") if layers else taps.default_taps(base)
    body = keras.Model(base.input, {"features": [layer.output for layer in chosen],
                                    "preact": [taps.preactivation(layer) for layer in chosen]},
                       name=net.lower())
    images = keras.Input(tuple(input_shape), name="images")
    x = images
    if normalization is not None:
        convention = wrap.named(NETWORKS[net], f"keras.applications.{net}")
        x = wrap.feed_layer(normalization[0], normalization[1], convention)(images)
    out = body(x)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(out["features"][-1])
    logits = keras.layers.Dense(num_classes, name="logits")(pooled)
    return keras.Model(images, {"logits": logits, "features": list(out["features"]),
                                "preact": list(out["preact"])}, name=model_name(name))
