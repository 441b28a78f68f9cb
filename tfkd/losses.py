"""Loss terms, each a small function returning the mean over the local batch (unscaled).

Every custom ``train_step`` in tfkd combines these unscaled terms with their weights and then
scales the total once with ``scale_for_replicas`` before taking gradients. Keras's optimizer
sums gradients across replicas, so dividing by the replica count makes N replicas with a
global batch B step exactly like one device with batch B. Logged values stay unscaled.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import ops


def scale_for_replicas(loss: tf.Tensor) -> tf.Tensor:
    """Divides a per-replica mean loss by the number of replicas in sync (1: unchanged)."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss / replicas if replicas > 1 else loss


def cross_entropy(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Mean softmax cross-entropy of integer ``labels`` against ``logits``."""
    return ops.mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))


def mean_squared_error(target: tf.Tensor, prediction: tf.Tensor) -> tf.Tensor:
    """Mean of the squared difference over every element."""
    return ops.mean(ops.square(ops.cast(target, prediction.dtype) - prediction))


def psnr(target: tf.Tensor, prediction: tf.Tensor, max_value: float = 255.0) -> tf.Tensor:
    """Per-image peak signal-to-noise ratio in dB; images on a [0, ``max_value``] scale.

    The prediction is clipped to the valid range first, as a viewer would display it.
    """
    prediction = ops.clip(prediction, 0.0, max_value)
    mse = ops.mean(ops.square(target - prediction), axis=tuple(range(1, len(prediction.shape))))
    return 10.0 * ops.log(max_value**2 / ops.maximum(mse, 1e-10)) / math.log(10.0)
