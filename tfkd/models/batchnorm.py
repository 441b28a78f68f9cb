"""Precise batch norm: a trained model's batch-norm moving statistics re-estimated on training
images once training is over.

A batch-norm layer normalizes with the batch's own statistics while it trains and with its
moving averages at inference. The averages are an exponential mean over the last hundred or
thousand steps (momentum 0.99 or 0.999), taken while the weights below the layer changed: on a
network that moves fast (a MobileNetV3 from random weights, a few hundred steps) they describe
weights that no longer exist, and the model predicts one class at inference while it is right
on most training batches (tfkd issue 34: 78% training accuracy, 9.7% validation). Computing
each layer's statistics afresh with the final weights (Wu and Johnson 2021, "Rethinking 'Batch'
in BatchNorm", section 3, "PreciseBN") removes that lag.

Here the model runs in training mode on batches of training images (evaluation geometry: the
pixels the deployed model sees), every trainable batch-norm layer with momentum 0 so that after
each batch its moving mean and variance are that batch's. Their average over the batches
(weighted by batch size; the variance pooled as E[x^2] - E[x]^2, so it is the variance of the
layer's input over all the images) becomes the layer's moving statistics. Frozen layers
(``trainable=False``: they ran in inference mode during training) are left as they are.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np


def trainable_batchnorms(model: Any) -> list[Any]:
    """The batch-norm layers of ``model`` (nested models included, each once) that ran in
    training mode while it trained: Keras 3's and tf_keras's ``BatchNormalization``."""
    found, seen = [], set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        is_bn = any(c.__name__ in ("BatchNormalization", "SyncBatchNormalization")
                    for c in type(layer).__mro__)
        if is_bn and layer.trainable and id(layer) not in seen and getattr(layer, "moving_mean", None) is not None:
            seen.add(id(layer))
            found.append(layer)
    return found


def recalibrate(model: Any, batches: Iterable[Any],
                forward: Callable[[Any], Any] | None = None) -> int:
    """Sets the moving mean and variance of every trainable batch-norm layer of ``model`` to the
    statistics of its input over ``batches`` (model inputs, the training images), the model
    running in training mode; returns how many layers changed (0: no batch, or no such layer).

    ``forward(batch)`` runs the model in training mode (default ``model(batch, training=True)``).
    The layers' momentum is restored afterwards; no trainable weight changes.
    """
    import tensorflow as tf

    layers = trainable_batchnorms(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    sums = [np.zeros(layer.moving_mean.shape, np.float64) for layer in layers]
    squares = [np.zeros(layer.moving_mean.shape, np.float64) for layer in layers]
    originals = [(np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)) for layer in layers]
    seen = 0
    try:
        for layer in layers:
            layer.momentum = 0.0  # read when the step is traced: after it, moving = this batch's
        run = tf.function(forward or (lambda x: model(x, training=True)))
        for batch in batches:
            count = int(batch.shape[0])
            if count < 2:  # a batch of one has no variance to measure
                continue
            run(batch)
            seen += count
            for i, layer in enumerate(layers):
                mean = np.asarray(layer.moving_mean, np.float64)
                sums[i] += count * mean
                squares[i] += count * (np.asarray(layer.moving_variance, np.float64) + mean * mean)
    except BaseException:  # interrupted half-way: the model as it was
        seen = 0
        raise
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        if not seen:
            for layer, (mean0, var0) in zip(layers, originals):
                layer.moving_mean.assign(mean0)
                layer.moving_variance.assign(var0)
    if not seen:
        return 0
    for layer, total, square in zip(layers, sums, squares):
        mean = total / seen
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(np.maximum(square / seen - mean * mean, 0.0).astype(np.float32))
    return len(layers)


def image_batches(images: np.ndarray, batch_size: int, normalize: Callable[[np.ndarray], Any]) -> Iterable[Any]:
    """``images`` (uint8 pixels) in batches of ``batch_size``, each through ``normalize``; a last
    batch smaller than half the size is dropped (its statistics would weigh a small sample)."""
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if len(chunk) * 2 < batch_size and start:
            return
        yield normalize(chunk)
