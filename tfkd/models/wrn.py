"""Wide ResNets (Zagoruyko & Komodakis 2016): ``wrn_{depth}_{width}``, pre-activation blocks.

Depth 6n+4: a 3x3 stem with 16 channels, three stages of n blocks with 16k/32k/64k channels,
then BN-ReLU before the head. The last stage's feature map is taken after that final BN-ReLU,
so it is exactly what the classifier sees.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Sequence

from tfkd.models.common import batch_norm, classifier_head, conv, default_api, finish


def wide_block(api: ModuleType, x: Any, filters: int, stride: int, sync_bn: bool, name: str) -> Any:
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus an identity or 1x1-conv shortcut."""
    equal = x.shape[-1] == filters and stride == 1
    act = batch_norm(api, sync_bn, name=f"{name}_bn1")(x)
    act = api.layers.ReLU(name=f"{name}_relu1")(act)
    shortcut = x if equal else conv(api, filters, 1, stride, name=f"{name}_down_conv")(act)
    out = conv(api, filters, 3, stride, name=f"{name}_conv1")(act)
    out = batch_norm(api, sync_bn, name=f"{name}_bn2")(out)
    out = api.layers.ReLU(name=f"{name}_relu2")(out)
    out = conv(api, filters, 3, 1, name=f"{name}_conv2")(out)
    return api.layers.Add(name=f"{name}_add")([out, shortcut])


def wide_resnet(depth: int, width: int, num_classes: int, input_shape: Sequence[int] = (32, 32, 3),
                sync_bn: bool = False, name: str | None = None, api: ModuleType | None = None) -> Any:
    """Builds ``wrn_{depth}_{width}``."""
    api = api or default_api()
    if (depth - 4) % 6:
        raise ValueError(f"wide ResNet depth must be 6n+4, got {depth}")
    blocks = (depth - 4) // 6
    inputs = api.Input(shape=tuple(input_shape), name="images")
    x = conv(api, 16, 3, name="stem_conv")(inputs)
    features, preact = [], []
    for stage, filters in enumerate((16 * width, 32 * width, 64 * width), start=1):
        for block in range(blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            x = wide_block(api, x, filters, stride, sync_bn, name=f"stage{stage}_block{block + 1}")
        pre = x  # pre-activation blocks: stages 1 and 2 end before any ReLU
        if stage == 3:
            pre = batch_norm(api, sync_bn, name="final_bn")(x)
            x = api.layers.ReLU(name="final_relu")(pre)
        features.append(x)
        preact.append(pre)
    logits = classifier_head(api, x, num_classes)
    return finish(api, inputs, features, logits, name or f"wrn_{depth}_{width}", preact)
