"""Building blocks shared by the model families.

Every builder takes ``api``, the Keras module to build with. It is ``keras`` (Keras 3)
everywhere except ``tfkd.compress``, which rebuilds the same architecture with ``tf_keras``
(Keras 2) for TensorFlow Model Optimization; the two produce identical layer lists, so
weights copy across one to one. For that reason the zoo uses stock layers only.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Sequence

import keras

def conv(api: ModuleType, filters: int, kernel: int, stride: int = 1, bias: bool = False,
         name: str | None = None) -> Any:
    """A 'same'-padded convolution with He-normal init, as the CIFAR reference models use."""
    return api.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=bias,
                             kernel_initializer="he_normal", name=name)


def batch_norm(api: ModuleType, sync: bool = False, name: str | None = None) -> Any:
    """Batch norm with PyTorch's defaults (momentum 0.9, epsilon 1e-5).

    ``sync=True`` computes batch statistics over the global batch across replicas, which makes
    a step on N replicas equal to the same step on one device.
    """
    kwargs = {"synchronized": True} if sync else {}
    return api.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name, **kwargs)


def classifier_head(api: ModuleType, x: Any, num_classes: int) -> Any:
    """Global average pooling + dense layer: the head every zoo model shares."""
    x = api.layers.GlobalAveragePooling2D(name="pool")(x)
    return api.layers.Dense(num_classes, name="logits")(x)


def finish(api: ModuleType, inputs: Any, features: Sequence[Any], logits: Any, name: str,
           preact: Sequence[Any] | None = None) -> Any:
    """Wraps a backbone as a functional model returning ``{"logits", "features", "preact"}``.

    ``features`` holds one feature map per stage, shallow to deep; distillation taps them and
    the reconstruction teacher decodes the last one. ``preact`` holds the same maps before their
    final ReLU (tensors the network computes anyway: no extra work), for methods that distill
    pre-activation features (OFD, ReviewKD's teacher side); a stage with no ReLU at its end
    gives its output itself.
    """
    return api.Model(inputs, {"logits": logits, "features": list(features),
                              "preact": list(preact if preact is not None else features)}, name=name)


def default_api() -> ModuleType:
    """The Keras module the zoo builds with unless told otherwise (Keras 3)."""
    return keras
