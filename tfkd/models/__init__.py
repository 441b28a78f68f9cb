"""The model zoo: ``tfkd.models.get(name, num_classes)`` builds any registered backbone.

Every model is a Keras functional model whose input is a normalized NHWC image batch and whose
output is ``{"logits": (N, classes), "features": [stage_1, ..., stage_k]}``: the logits for
classification and one feature map per stage, shallow to deep, for distillation.

The registry is plain data (name -> builder module, function and arguments), so option
validation can check a model name without importing Keras; ``get`` imports the builder.
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
    module, function, args, kwargs = REGISTRY[name]
    builder = getattr(importlib.import_module(f"tfkd.models.{module}"), function)
    return builder(*args, num_classes=num_classes, input_shape=input_shape, sync_bn=sync_bn,
                   name=name, api=api, **kwargs)
