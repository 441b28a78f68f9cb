"""The ConvBlock adapter: maps a student feature map onto a teacher's (METHOD.md).

1x1 convolution without bias + batch norm (+ ReLU with ``relu=True``), from student channels to
teacher channels; the spatial size is resized (bilinear) when the two differ. Adapters train with
the student and are dropped at export.

Why the optional ReLU: the zoo's stage outputs end in a ReLU, so a teacher's feature maps are
non-negative and sparse, while a batch-normalized adapter output is half negative. A
discriminator then tells the two apart by sign alone, and the feature loss spends itself on
values the teacher can never produce. RepDistiller's FitNet regressor ends in a ReLU for the
same reason.
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
import tensorflow as tf

from tfkd.models.common import batch_norm


@keras.saving.register_keras_serializable(package="tfkd")
class ConvBlock(keras.layers.Layer):
    """Adapter from a student feature map to a (H, W, C) teacher feature map."""

    def __init__(self, target_shape: Sequence[int], sync_bn: bool = False, relu: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target_shape = [int(v) for v in target_shape]
        self.sync_bn = bool(sync_bn)
        self.relu = bool(relu)
        self.conv = keras.layers.Conv2D(self.target_shape[-1], 1, use_bias=False,
                                        kernel_initializer="he_normal", name="conv")
        self.bn = batch_norm(keras, self.sync_bn, name="bn")

    def build(self, input_shape: Sequence[int]) -> None:
        self.conv.build(input_shape)
        self.bn.build((*input_shape[:-1], self.target_shape[-1]))

    def call(self, features: tf.Tensor, training: bool = False) -> tf.Tensor:
        x = self.bn(self.conv(features), training=training)
        if self.relu:
            x = tf.nn.relu(x)
        if tuple(x.shape[1:3]) != tuple(self.target_shape[:2]):
            x = tf.image.resize(x, self.target_shape[:2], method="bilinear")
        return x

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "target_shape": self.target_shape, "sync_bn": self.sync_bn,
                "relu": self.relu}
