"""CIFAR ResNets (He et al. 2016, section 4.2) as used by the distillation literature.

``resnet{8,14,20,32,44,56,110}``: depth 6n+2, three stages of n basic blocks with 16/32/64
channels; ``resnet8x4`` and ``resnet32x4``: the same with 32 stem and 64/128/256 stage channels
(the RepDistiller variants). Shortcuts are 1x1 convolutions + batch norm where the shape
changes (option B), as in RepDistiller, whose parameter counts the tests check.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Sequence

from tfkd.models.common import batch_norm, classifier_head, conv, default_api, finish


def basic_block(api: ModuleType, x: Any, filters: int, stride: int, sync_bn: bool, name: str) -> Any:
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""
    in_channels = x.shape[-1]
    out = conv(api, filters, 3, stride, name=f"{name}_conv1")(x)
    out = batch_norm(api, sync_bn, name=f"{name}_bn1")(out)
    out = api.layers.ReLU(name=f"{name}_relu1")(out)
    out = conv(api, filters, 3, 1, name=f"{name}_conv2")(out)
    out = batch_norm(api, sync_bn, name=f"{name}_bn2")(out)
    shortcut = x
    if stride != 1 or in_channels != filters:
        shortcut = conv(api, filters, 1, stride, name=f"{name}_down_conv")(x)
        shortcut = batch_norm(api, sync_bn, name=f"{name}_down_bn")(shortcut)
    out = api.layers.Add(name=f"{name}_add")([out, shortcut])
    return api.layers.ReLU(name=f"{name}_out")(out)


def cifar_resnet(depth: int, num_classes: int, widths: Sequence[int] = (16, 16, 32, 64),
                 input_shape: Sequence[int] = (32, 32, 3), sync_bn: bool = False,
                 name: str | None = None, api: ModuleType | None = None) -> Any:
    """Builds a CIFAR ResNet of ``depth`` = 6n+2 layers; ``widths`` = stem + three stages."""
    api = api or default_api()
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    blocks = (depth - 2) // 6
    inputs = api.Input(shape=tuple(input_shape), name="images")
    x = conv(api, widths[0], 3, name="stem_conv")(inputs)
    x = batch_norm(api, sync_bn, name="stem_bn")(x)
    x = api.layers.ReLU(name="stem_relu")(x)
    features = []
    for stage, filters in enumerate(widths[1:], start=1):
        for block in range(blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            x = basic_block(api, x, filters, stride, sync_bn, name=f"stage{stage}_block{block + 1}")
        features.append(x)
    logits = classifier_head(api, x, num_classes)
    return finish(api, inputs, features, logits, name or f"resnet{depth}")
