"""Feeding a trained model what it expects: its input convention, read from the model.

tfkd's input pipeline hands every model images normalized with the run's dataset statistics
(``Data.normalize``). A teacher may expect something else: a tfkd teacher of the same data
its own stored normalization, a model with its preprocessing inside (``keras.applications``,
imported PyTorch ResNets) [0, 255] pixels. ``input_convention`` reads which one from the model,
and ``feed`` puts the exact per-channel affine map in front (one Normalization layer: no extra
work when the conventions agree, none worth counting when they do not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class InputConvention:
    """What a model takes: pixels normalized with ``mean``/``std`` (on the [0, 255] scale;
    ``mean`` 0 and ``std`` 1 are raw [0, 255] pixels) and why we think so."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    reason: str

    @property
    def pixels(self) -> bool:
        """True for raw [0, 255] pixels."""
        return all(m == 0 for m in self.mean) and all(s == 1 for s in self.std)


def pixels(reason: str, channels: int = 3) -> InputConvention:
    """Raw [0, 255] pixels."""
    return InputConvention((0.0,) * channels, (1.0,) * channels, reason)


#: The input conventions a user can name (``distill.teacher_input``), on the [0, 255] scale.
NAMED = {
    "0-255": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "0-1": ((0.0, 0.0, 0.0), (255.0, 255.0, 255.0)),
    "-1-1": ((127.5, 127.5, 127.5), (127.5, 127.5, 127.5)),
    # torchvision's (and keras.applications' 'torch' mode) ImageNet statistics on [0, 1] pixels
    "imagenet": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
}


#: What a teacher's input option may say: read it (``auto``), a named convention, or this run's.
INPUT_CHOICES = ("auto", *NAMED, "dataset")
#: What a teacher's output option may say (``tfkd.models.taps``): read it, or say it.
OUTPUT_CHOICES = ("auto", "logits", "probabilities")


def named(name: str, reason: str) -> InputConvention:
    """One of ``NAMED``'s conventions."""
    mean, std = NAMED[name]
    return InputConvention(mean, std, reason)


PREPROCESSING_LAYERS = ("Rescaling", "Normalization")


def first_layers(model: Any) -> list[Any]:
    """The layers right after the model's input, in graph order (nested models opened)."""
    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    if layers and hasattr(layers[0], "layers") and hasattr(layers[0], "inputs"):
        return first_layers(layers[0])
    return layers[:2]


def builtin_preprocessing(model: Any) -> str | None:
    """The description of the preprocessing layer a model starts with (it then takes [0, 255]
    pixels, as ``keras.applications`` models do), or None."""
    for layer in first_layers(model)[:1]:
        kind = type(layer).__name__
        if kind in PREPROCESSING_LAYERS:
            if kind == "Rescaling":
                return f"starts with Rescaling(scale={layer.scale}, offset={layer.offset})"
            return f"starts with {kind}"
    return None


def converter_convention(converter: Any, what: str) -> InputConvention:
    """The input convention of a KerasHub image converter: the network takes
    ``pixels * scale + offset`` (per channel, [0, 255] pixels; unset: 1 and 0)."""
    scale = np.broadcast_to(np.asarray(1.0 if converter.scale is None else converter.scale, np.float64), (3,))
    offset = np.broadcast_to(np.asarray(0.0 if converter.offset is None else converter.offset, np.float64), (3,))
    return InputConvention(tuple((-offset / scale).tolist()), tuple((1.0 / scale).tolist()),
                           f"the image converter of {what} (scale {np.round(scale, 6).tolist()}, "
                           f"offset {np.round(offset, 6).tolist()})")


def separate_preprocessing(model: Any, what: str) -> InputConvention | None:
    """The input convention a KerasHub task keeps in its separate preprocessor (its image
    converter's rescaling), or None for a model without one."""
    converter = getattr(getattr(model, "preprocessor", None), "image_converter", None)
    if converter is None or not hasattr(converter, "scale"):
        return None
    return converter_convention(converter, what)


def _affine(data_mean: Sequence[float], data_std: Sequence[float],
            convention: InputConvention) -> tuple[np.ndarray, np.ndarray]:
    d_mean, d_std = np.asarray(data_mean, np.float64), np.asarray(data_std, np.float64)
    t_mean, t_std = np.asarray(convention.mean, np.float64), np.asarray(convention.std, np.float64)
    return d_std / t_std, (d_mean - t_mean) / t_std  # model_x = x * scale + shift


def feed_layer(data_mean: Sequence[float], data_std: Sequence[float], convention: InputConvention,
               name: str = "feed", api: Any = None) -> Any:
    """The layer turning run-normalized images (``data_mean``/``data_std``) into what
    ``convention`` says (an identity layer when the two agree). ``api``: the Keras module that
    builds it (default Keras 3; tf_keras for ``tfkd.compress``)."""
    if api is None:
        import keras
    else:
        keras = api

    scale, shift = _affine(data_mean, data_std, convention)
    if np.allclose(scale, 1.0, rtol=0, atol=1e-7) and np.allclose(shift, 0.0, rtol=0, atol=1e-7):
        return keras.layers.Identity(name=name)
    # Normalization computes (x - m) / sqrt(v): m = -shift / scale, v = 1 / scale^2 gives x*scale + shift
    return keras.layers.Normalization(mean=list(-shift / scale), variance=list(1.0 / scale**2), name=name)


def feed(model: Any, data_mean: Sequence[float], data_std: Sequence[float],
         convention: InputConvention, name: str | None = None) -> Any:
    """``model`` behind a layer that turns run-normalized images (``data_mean``/``data_std``)
    into what ``convention`` says it takes; ``model`` itself when the two agree."""
    import keras

    layer = feed_layer(data_mean, data_std, convention)
    if isinstance(layer, keras.layers.Identity):
        return model
    images = keras.Input(tuple(model.input_shape[1:]), name="images")
    outputs = model(layer(images))
    return keras.Model(images, outputs, name=name or model.name)


def unwrap(model: Any) -> Any:
    """The model inside ``feed``'s wrappers (``model`` itself when it is not wrapped): its layer
    graph holds what a method reads from the model's layers (OFD's batch norms)."""
    while True:
        layers = getattr(model, "layers", [])
        names = [layer.name for layer in layers]
        if "feed" in names and layers and hasattr(layers[-1], "layers"):
            model = layers[-1]
            continue
        return model
