"""MobileNetV2 (Sandler et al. 2018) adapted to 32x32 inputs.

The CIFAR adaptation keeps the ImageNet block table but runs the stem and the first strided
stage at stride 1, so a 32x32 input ends at 4x4 instead of 1x1. Stages are the groups of blocks
sharing one resolution (32, 16, 8 and 4 px); the last one ends with the 1x1 conv to 1280
(scaled by ``width`` when ``width`` > 1) that feeds the head.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Sequence

from tfkd.models.common import batch_norm, classifier_head, conv, default_api, finish

#: (expansion, output channels, blocks, stride) per group, CIFAR strides.
MOBILENETV2_GROUPS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                      (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _divisible(value: float, divisor: int = 8) -> int:
    """Rounds channels to a multiple of 8 as the reference implementation does."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def inverted_residual(api: ModuleType, x: Any, expansion: int, filters: int, stride: int,
                      sync_bn: bool, name: str) -> Any:
    """1x1 expand - 3x3 depthwise - 1x1 linear projection, residual when shapes match."""
    in_channels = x.shape[-1]
    out = x
    if expansion != 1:
        out = conv(api, in_channels * expansion, 1, name=f"{name}_expand")(out)
        out = batch_norm(api, sync_bn, name=f"{name}_expand_bn")(out)
        out = api.layers.ReLU(6.0, name=f"{name}_expand_relu")(out)
    out = api.layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False,
                                     depthwise_initializer="he_normal", name=f"{name}_dw")(out)
    out = batch_norm(api, sync_bn, name=f"{name}_dw_bn")(out)
    out = api.layers.ReLU(6.0, name=f"{name}_dw_relu")(out)
    out = conv(api, filters, 1, name=f"{name}_project")(out)
    out = batch_norm(api, sync_bn, name=f"{name}_project_bn")(out)
    if stride == 1 and in_channels == filters:
        out = api.layers.Add(name=f"{name}_add")([x, out])
    return out


def mobilenetv2(num_classes: int, width: float = 1.0, input_shape: Sequence[int] = (32, 32, 3),
                sync_bn: bool = False, name: str | None = None, api: ModuleType | None = None) -> Any:
    """Builds a CIFAR MobileNetV2 with width multiplier ``width``."""
    api = api or default_api()
    inputs = api.Input(shape=tuple(input_shape), name="images")
    x = conv(api, _divisible(32 * width), 3, name="stem_conv")(inputs)
    x = batch_norm(api, sync_bn, name="stem_bn")(x)
    x = api.layers.ReLU(6.0, name="stem_relu")(x)
    features = []
    for g, (expansion, channels, blocks, stride) in enumerate(MOBILENETV2_GROUPS):
        if stride == 2:
            features.append(x)  # the last map at the previous resolution
        for b in range(blocks):
            x = inverted_residual(api, x, expansion, _divisible(channels * width),
                                  stride if b == 0 else 1, sync_bn, name=f"group{g + 1}_block{b + 1}")
    x = conv(api, _divisible(1280 * max(1.0, width)), 1, name="final_conv")(x)
    pre = batch_norm(api, sync_bn, name="final_bn")(x)
    x = api.layers.ReLU(6.0, name="final_relu")(pre)
    preact = [*features, pre]  # block outputs are linear (no ReLU): their own pre-activation
    features.append(x)
    logits = classifier_head(api, x, num_classes)
    return finish(api, inputs, features, logits, name or "mobilenetv2", preact)
