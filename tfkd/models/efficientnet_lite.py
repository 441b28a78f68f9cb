"""EfficientNet-Lite0: EfficientNet-B0 made for integer accelerators, as its authors define it.

The TensorFlow EfficientNet authors' "lite" variants (tensorflow/tpu, models/official/efficientnet/
lite) take EfficientNet-B0's block table and remove what quantizes badly: no squeeze-and-
excitation, ReLU6 instead of swish, and (for the larger variants) the stem and head kept fixed
while the network scales. Lite0 is B0's width and depth, so it is the B0 table as it stands.
Its published size is 4.7M parameters with the 1000-class ImageNet head (KerasHub's
``efficientnet_lite0_ra_imagenet`` preset: 4,652,008; the test suite checks ours against it).

The network keeps ImageNet's strides (a 224-px image ends at 7x7): it is a student for inputs
of 96 px and more. Stages are the last maps at each resolution; the head's 1x1 convolution to
1280 channels ends the last one. Built with ``api`` (Keras 3, or tf_keras for
``tfkd.compress``) from stock layers only.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Sequence

from tfkd.models.common import classifier_head, default_api, finish

#: EfficientNet-B0's blocks: (expansion, kernel, stride, output channels, repeats) per group.
B0_GROUPS = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
             (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def _bn(api: ModuleType, sync_bn: bool, name: str) -> Any:
    # The authors' batch norm: momentum 0.99, epsilon 1e-3 (TensorFlow's defaults).
    kwargs = {"synchronized": True} if sync_bn else {}
    return api.layers.BatchNormalization(momentum=0.99, epsilon=1e-3, name=name, **kwargs)


def _conv(api: ModuleType, filters: int, kernel: int, stride: int, name: str) -> Any:
    return api.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                             kernel_initializer="he_normal", name=name)


def mbconv(api: ModuleType, x: Any, expansion: int, kernel: int, stride: int, filters: int,
           sync_bn: bool, name: str) -> Any:
    """1x1 expansion (skipped at expansion 1), kxk depthwise, 1x1 linear projection, all with
    batch norm and ReLU6 but the projection; residual when the shape is kept."""
    in_channels = x.shape[-1]
    out = x
    if expansion != 1:
        out = _conv(api, in_channels * expansion, 1, 1, f"{name}_expand")(out)
        out = _bn(api, sync_bn, f"{name}_expand_bn")(out)
        out = api.layers.ReLU(6.0, name=f"{name}_expand_relu")(out)
    out = api.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                     depthwise_initializer="he_normal", name=f"{name}_dw")(out)
    out = _bn(api, sync_bn, f"{name}_dw_bn")(out)
    out = api.layers.ReLU(6.0, name=f"{name}_dw_relu")(out)
    out = _conv(api, filters, 1, 1, f"{name}_project")(out)
    out = _bn(api, sync_bn, f"{name}_project_bn")(out)
    if stride == 1 and in_channels == filters:
        out = api.layers.Add(name=f"{name}_add")([x, out])
    return out


def efficientnet_lite0(num_classes: int, input_shape: Sequence[int] = (224, 224, 3),
                       sync_bn: bool = False, name: str | None = None,
                       api: ModuleType | None = None) -> Any:
    """Builds EfficientNet-Lite0 for ``num_classes`` classes (``{"logits", "features", "preact"}``)."""
    api = api or default_api()
    inputs = api.Input(shape=tuple(input_shape), name="images")
    x = _conv(api, STEM_CHANNELS, 3, 2, "stem_conv")(inputs)
    x = _bn(api, sync_bn, "stem_bn")(x)
    x = api.layers.ReLU(6.0, name="stem_relu")(x)
    features = []
    for g, (expansion, kernel, stride, channels, repeats) in enumerate(B0_GROUPS):
        if stride == 2:
            features.append(x)  # the last map at the previous resolution
        for b in range(repeats):
            x = mbconv(api, x, expansion, kernel, stride if b == 0 else 1, channels, sync_bn,
                       name=f"group{g + 1}_block{b + 1}")
    x = _conv(api, HEAD_CHANNELS, 1, 1, "head_conv")(x)
    pre = _bn(api, sync_bn, "head_bn")(x)
    x = api.layers.ReLU(6.0, name="head_relu")(pre)
    preact = [*features, pre]  # group outputs are linear (no ReLU): their own pre-activation
    features.append(x)
    logits = classifier_head(api, x, num_classes)
    return finish(api, inputs, features, logits, name or "efficientnet_lite0", preact)
