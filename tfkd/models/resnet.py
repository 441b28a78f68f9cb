"""CIFAR ResNets (He et al. 2016, section 4.2) as used by the distillation literature.

``resnet{8,14,20,32,44,56,110}``: depth 6n+2, three stages of n basic blocks with 16/32/64
channels; ``resnet8x4`` and ``resnet32x4``: the same with 32 stem and 64/128/256 stage channels
(the RepDistiller variants). Shortcuts are 1x1 convolutions + batch norm where the shape
changes (option B), as in RepDistiller, whose parameter counts the tests check.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable, Sequence

from tfkd.models.common import batch_norm, classifier_head, conv, default_api, finish


def basic_block(api: ModuleType, x: Any, filters: int, stride: int, sync_bn: bool, name: str) -> Any:
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU; returns (output, output before the ReLU)."""
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
    pre = api.layers.Add(name=f"{name}_add")([out, shortcut])
    return api.layers.ReLU(name=f"{name}_out")(pre), pre


def cifar_resnet(depth: int, num_classes: int, widths: Sequence[int] = (16, 16, 32, 64),
                 input_shape: Sequence[int] = (32, 32, 3), sync_bn: bool = False,
                 name: str | None = None, api: ModuleType | None = None) -> Any:
    """Builds a CIFAR ResNet of ``depth`` = 6n+2 layers; ``widths`` = stem + three stages."""
    api = api or default_api()
    inputs = api.Input(shape=tuple(input_shape), name="images")
    return _network(api, inputs, inputs, depth, widths, basic_block, num_classes, sync_bn,
                    name or f"resnet{depth}")


def _network(api: ModuleType, inputs: Any, x: Any, depth: int, widths: Sequence[int],
             block: Callable[..., Any], num_classes: int, sync_bn: bool, name: str) -> Any:
    """Stem (conv3x3-BN-ReLU, ``widths[0]`` channels), three stages of (depth - 2) / 6 ``block``s
    with ``widths[1:]`` channels, the first block of stages 2 and 3 at stride 2, and the head;
    both shortcut options share it, so their layer names match."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    x = conv(api, widths[0], 3, name="stem_conv")(x)
    x = batch_norm(api, sync_bn, name="stem_bn")(x)
    x = api.layers.ReLU(name="stem_relu")(x)
    features, preact = [], []
    for stage, filters in enumerate(widths[1:], start=1):
        for index in range((depth - 2) // 6):
            stride = 2 if stage > 1 and index == 0 else 1
            x, pre = block(api, x, filters, stride, sync_bn, name=f"stage{stage}_block{index + 1}")
        features.append(x)
        preact.append(pre)
    logits = classifier_head(api, x, num_classes)
    return finish(api, inputs, features, logits, name, preact)


def _conv3x3_torch(api: ModuleType, x: Any, filters: int, stride: int, name: str) -> Any:
    """A 3x3 convolution padded 1 on every side as PyTorch's ``padding=1`` does (Keras's 'same'
    pads 0 before and 1 after an even input at stride 2), without bias."""
    if stride == 1:
        return conv(api, filters, 3, 1, name=name)(x)
    x = api.layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
    return api.layers.Conv2D(filters, 3, strides=stride, padding="valid", use_bias=False,
                             kernel_initializer="he_normal", name=name)(x)


def shortcut_a(api: ModuleType, x: Any, filters: int, name: str) -> Any:
    """He et al.'s parameter-free "option A" shortcut: every other row and column (starting at
    0), zero-padded with (filters - channels) / 2 channels on each side. Stock layers only:
    a 1x1 average pool with stride 2 subsamples; the channels are padded as the third spatial
    axis of a 5-D view."""
    height, width, channels = (int(d) for d in x.shape[1:])
    extra = filters - channels
    x = api.layers.AveragePooling2D(1, strides=2, name=f"{name}_subsample")(x)
    x = api.layers.Reshape((height // 2, width // 2, channels, 1), name=f"{name}_as_5d")(x)
    x = api.layers.ZeroPadding3D(((0, 0), (0, 0), (extra // 2, extra - extra // 2)), name=f"{name}_pad")(x)
    return api.layers.Reshape((height // 2, width // 2, filters), name=f"{name}_as_4d")(x)


def basic_block_a(api: ModuleType, x: Any, filters: int, stride: int, sync_bn: bool, name: str) -> Any:
    """conv3x3-BN-ReLU-conv3x3-BN plus the option-A shortcut, then ReLU (PyTorch padding);
    returns (output, output before the ReLU)."""
    out = _conv3x3_torch(api, x, filters, stride, f"{name}_conv1")
    out = batch_norm(api, sync_bn, name=f"{name}_bn1")(out)
    out = api.layers.ReLU(name=f"{name}_relu1")(out)
    out = conv(api, filters, 3, 1, name=f"{name}_conv2")(out)
    out = batch_norm(api, sync_bn, name=f"{name}_bn2")(out)
    shortcut = x
    if stride != 1 or int(x.shape[-1]) != filters:
        shortcut = shortcut_a(api, x, filters, f"{name}_shortcut")
    pre = api.layers.Add(name=f"{name}_add")([out, shortcut])
    return api.layers.ReLU(name=f"{name}_out")(pre), pre


def cifar_resnet_a(depth: int, num_classes: int, input_shape: Sequence[int] = (32, 32, 3),
                   sync_bn: bool = False, name: str | None = None, api: ModuleType | None = None,
                   pixel_normalization: tuple[Sequence[float], Sequence[float]] | None = None) -> Any:
    """The CIFAR ResNet of He et al. 2016 exactly (``resnet{20,32,44,56,110}a``): 16/32/64
    channels, option-A shortcuts, PyTorch's padding, so PyTorch weights import one to one
    (``tfkd.models.pytorch``). With ``pixel_normalization`` (per-channel mean, std on the
    [0, 255] scale) the model starts with that normalization and takes pixels."""
    api = api or default_api()
    inputs = api.Input(shape=tuple(input_shape), name="images")
    x = inputs
    if pixel_normalization is not None:
        mean, std = pixel_normalization
        x = api.layers.Normalization(mean=list(mean), variance=[s * s for s in std], name="normalize")(x)
    return _network(api, inputs, x, depth, (16, 16, 32, 64), basic_block_a, num_classes, sync_bn,
                    name or f"resnet{depth}a")
