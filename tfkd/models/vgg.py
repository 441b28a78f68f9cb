"""CIFAR VGG with batch norm (the RepDistiller variants): ``vgg8``, ``vgg11``, ``vgg13``.

Five blocks of 3x3 conv-BN-ReLU layers; 2x2 max pooling after the first three blocks (and after
the fourth for inputs of 64 px or more), so on CIFAR the last two blocks run at 4x4.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Sequence

from tfkd.models.common import batch_norm, classifier_head, conv, default_api, finish

#: Convolutions per block for each depth.
VGG_BLOCKS = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def vgg(depth: int, num_classes: int, input_shape: Sequence[int] = (32, 32, 3), sync_bn: bool = False,
        name: str | None = None, api: ModuleType | None = None) -> Any:
    """Builds ``vgg{depth}`` with batch norm."""
    api = api or default_api()
    if depth not in VGG_BLOCKS:
        raise ValueError(f"VGG depth must be one of {sorted(VGG_BLOCKS)}, got {depth}")
    inputs = api.Input(shape=tuple(input_shape), name="images")
    x = inputs
    features, preact = [], []
    pooled_blocks = 4 if input_shape[0] >= 64 else 3
    for b, block in enumerate(VGG_BLOCKS[depth]):
        for i, filters in enumerate(block):
            x = conv(api, filters, 3, bias=True, name=f"block{b}_conv{i + 1}")(x)
            pre = batch_norm(api, sync_bn, name=f"block{b}_bn{i + 1}")(x)
            x = api.layers.ReLU(name=f"block{b}_relu{i + 1}")(pre)
        features.append(x)
        preact.append(pre)
        if b < pooled_blocks:
            x = api.layers.MaxPooling2D(2, name=f"block{b}_pool")(x)
    logits = classifier_head(api, x, num_classes)
    return finish(api, inputs, features, logits, name or f"vgg{depth}", preact)
