"""The model zoo: ``tfkd.models.get(name, num_classes)`` builds any registered backbone.

Every model is a Keras functional model whose input is a normalized NHWC image batch and whose
output is ``{"logits": (N, classes), "features": [stage_1, ..., stage_k]}``: the logits for
classification and one feature map per stage, shallow to deep, for distillation.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, Callable, Sequence

from tfkd.models.mobilenetv2 import mobilenetv2
from tfkd.models.resnet import cifar_resnet
from tfkd.models.vgg import vgg
from tfkd.models.wrn import wide_resnet

_RESNET_WIDTHS = (16, 16, 32, 64)
_RESNET_X4_WIDTHS = (32, 64, 128, 256)

#: name -> builder(num_classes, input_shape=..., sync_bn=..., name=..., api=...)
REGISTRY: dict[str, Callable[..., Any]] = {
    **{f"resnet{d}": functools.partial(cifar_resnet, d, widths=_RESNET_WIDTHS)
       for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": functools.partial(cifar_resnet, 8, widths=_RESNET_X4_WIDTHS),
    "resnet32x4": functools.partial(cifar_resnet, 32, widths=_RESNET_X4_WIDTHS),
    **{f"wrn_{d}_{w}": functools.partial(wide_resnet, d, w)
       for d, w in ((16, 1), (16, 2), (40, 1), (40, 2), (28, 4))},
    **{f"vgg{d}": functools.partial(vgg, d) for d in (8, 11, 13)},
    "mobilenetv2": functools.partial(mobilenetv2, width=1.0),
    "mobilenetv2_x0_5": functools.partial(mobilenetv2, width=0.5),
}


def names() -> list[str]:
    """All registered model names."""
    return sorted(REGISTRY)


def get(name: str, num_classes: int, input_shape: Sequence[int] = (32, 32, 3),
        sync_bn: bool = False, api: ModuleType | None = None) -> Any:
    """Builds the registered model ``name`` for ``num_classes`` classes.

    Raises ``KeyError`` naming the known models when ``name`` is not registered.
    """
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(names())}")
    return REGISTRY[name](num_classes=num_classes, input_shape=input_shape, sync_bn=sync_bn,
                          name=name, api=api)
