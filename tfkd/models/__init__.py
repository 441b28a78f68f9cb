"""The model zoo: ``tfkd.models.get(name, num_classes)`` builds any registered backbone.

Every model is a Keras functional model whose input is a normalized NHWC image batch and whose
output is ``{"logits": (N, classes), "features": [stage_1, ..., stage_k]}``: the logits for
classification and one feature map per stage, shallow to deep, for distillation.

The registry is plain data (name -> builder module, function and arguments), so option
validation can check a model name without importing Keras; ``get`` imports the builder.
``keras:NAME`` names a ``keras.applications`` network and ``keras_hub:PRESET`` a KerasHub
preset's backbone, each with a new head (``tfkd.models.applications``).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Sequence

_RESNET_WIDTHS = (16, 16, 32, 64)
_RESNET_X4_WIDTHS = (32, 64, 128, 256)

#: name -> (module under tfkd.models, builder function, positional args, keyword args)
REGISTRY: dict[str, tuple[str, str, tuple[Any, ...], dict[str, Any]]] = {
    **{f"resnet{d}": ("resnet", "cifar_resnet", (d,), {"widths": _RESNET_WIDTHS})
       for d in (8, 14, 20, 32, 44, 56, 110)},
    **{f"resnet{d}a": ("resnet", "cifar_resnet_a", (d,), {}) for d in (20, 32, 44, 56, 110)},
    "resnet8x4": ("resnet", "cifar_resnet", (8,), {"widths": _RESNET_X4_WIDTHS}),
    "resnet32x4": ("resnet", "cifar_resnet", (32,), {"widths": _RESNET_X4_WIDTHS}),
    **{f"wrn_{d}_{w}": ("wrn", "wide_resnet", (d, w), {}) for d, w in ((16, 1), (16, 2), (40, 1), (40, 2), (28, 4))},
    **{f"vgg{d}": ("vgg", "vgg", (d,), {}) for d in (8, 11, 13)},
    "mobilenetv2": ("mobilenetv2", "mobilenetv2", (), {"width": 1.0}),
    "mobilenetv2_x0_5": ("mobilenetv2", "mobilenetv2", (), {"width": 0.5}),
    "efficientnet_lite0": ("efficientnet_lite", "efficientnet_lite0", (), {}),
}
#: Zoo models with ImageNet strides (a 32-stride network: inputs of 96 px and more).
IMAGENET_STRIDES = ("efficientnet_lite0",)


def names() -> list[str]:
    """All registered model names."""
    return sorted(REGISTRY)


def is_known(name: str) -> bool:
    """A zoo model, a ``keras:NAME`` network or a ``keras_hub:PRESET`` (checked without importing
    Keras)."""
    from tfkd.models import applications

    return name in REGISTRY or applications.is_application(name)


def expected_names() -> str:
    """What a model option may say, for error messages."""
    return f"a zoo model ({', '.join(names())}), keras:NAME or keras_hub:PRESET (README, 'Your own model')"


def get(name: str, num_classes: int, input_shape: Sequence[int] = (32, 32, 3),
        sync_bn: bool = False, api: ModuleType | None = None, weights: str | None = None,
        normalization: tuple[Sequence[float], Sequence[float]] | None = None,
        layers: Sequence[str] = ()) -> Any:
    """Builds the registered model ``name`` for ``num_classes`` classes.

    ``keras:NAME``/``keras_hub:PRESET`` networks also take ``weights`` (None, ``imagenet`` or a file),
    ``normalization`` (the run's mean and std, which their feed layer maps onto the network's
    own convention) and ``layers`` (named taps). Raises ``KeyError`` naming the known models
    when ``name`` is not registered.
    """
    from tfkd.models import applications

    if name.startswith((applications.PREFIX, applications.HUB_PREFIX)):
        return applications.build(name, num_classes, input_shape, weights=weights,
                                  normalization=normalization, layers=layers, api=api)
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(names())}")
    module, function, args, kwargs = REGISTRY[name]
    builder = getattr(importlib.import_module(f"tfkd.models.{module}"), function)
    return builder(*args, num_classes=num_classes, input_shape=input_shape, sync_bn=sync_bn,
                   name=name, api=api, **kwargs)
