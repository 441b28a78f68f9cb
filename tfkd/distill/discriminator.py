"""The feature-map discriminator (METHOD.md): fully convolutional, so it judges spatial structure.

3x3 conv (C -> C/2), LeakyReLU(0.2), 3x3 conv stride 2 (C/2 -> C/4), batch norm,
LeakyReLU(0.2), 3x3 conv (C/4 -> 1), global average -> one logit per feature map.
``width`` scales the two hidden channel counts (METHOD.md's design is ``width=1``), so its
capacity can be tuned against the student's.
"""

from __future__ import annotations

from typing import Sequence

import keras

from tfkd.models.common import batch_norm


def build_discriminator(feature_shape: Sequence[int], sync_bn: bool = False,
                        name: str = "discriminator", width: float = 1.0) -> keras.Model:
    """A discriminator for (H, W, C) feature maps returning one logit per map, shape (N, 1)."""
    channels = int(feature_shape[-1])
    hidden = [max(int(round(channels * width / d)), 1) for d in (2, 4)]
    inputs = keras.Input(shape=tuple(feature_shape), name="features")
    x = keras.layers.Conv2D(hidden[0], 3, padding="same", name="conv1")(inputs)
    x = keras.layers.LeakyReLU(0.2, name="lrelu1")(x)
    x = keras.layers.Conv2D(hidden[1], 3, strides=2, padding="same", use_bias=False,
                            name="conv2")(x)
    x = batch_norm(keras, sync_bn, name="bn2")(x)
    x = keras.layers.LeakyReLU(0.2, name="lrelu2")(x)
    x = keras.layers.Conv2D(1, 3, padding="same", name="conv3")(x)
    outputs = keras.layers.GlobalAveragePooling2D(name="logit")(x)
    return keras.Model(inputs, outputs, name=name)
