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


# ----------------------------------------------------------------------- distillation terms
def standardize(logits: tf.Tensor, eps: float = 1e-7) -> tf.Tensor:
    """Logit standardization (Sun et al. 2024): ``(z - mean(z)) / (std(z) + eps)`` per example,
    with the sample standard deviation (n - 1), as the authors' ``torch.std``."""
    mean = ops.mean(logits, axis=-1, keepdims=True)
    count = ops.cast(ops.shape(logits)[-1], logits.dtype)
    var = ops.sum(ops.square(logits - mean), axis=-1, keepdims=True) / (count - 1.0)
    return (logits - mean) / (ops.sqrt(var) + eps)


def kd(teacher_logits: tf.Tensor, student_logits: tf.Tensor, temperature: float) -> tf.Tensor:
    """Hinton KD: ``tau^2 * KL(softmax(t / tau) || softmax(s / tau))``, mean over the batch.

    Not ``keras.distillation.LogitsDistillation``: it wraps a ``keras.losses.KLDivergence``
    object, which divides by the replica count inside a replica context, while every other term
    here is unscaled; mixing the two would silently down-weight KD under MirroredStrategy. (Its
    default ``loss="kl_divergence"`` also resolves to the bare function, which it applies to raw
    logits without a softmax.) The tests check this function equals LogitsDistillation with a
    ``KLDivergence()`` instance on one device.
    """
    t = ops.log_softmax(teacher_logits / temperature, axis=-1)
    s = ops.log_softmax(student_logits / temperature, axis=-1)
    kl = ops.sum(ops.exp(t) * (t - s), axis=-1)
    return temperature**2 * ops.mean(kl)


def feature(adapted_student: tf.Tensor, teacher_features: tf.Tensor) -> tf.Tensor:
    """Pixel-level feature loss ``mean((C(F_s) - F_t)^2)`` over every element (also FitNet's hint)."""
    return mean_squared_error(teacher_features, adapted_student)


def attention_map(features: tf.Tensor) -> tf.Tensor:
    """Attention transfer's map: ``mean_c(F^2)`` flattened and L2-normalized per example."""
    energy = ops.mean(ops.square(features), axis=-1)
    flat = ops.reshape(energy, (ops.shape(energy)[0], -1))
    return flat / ops.maximum(ops.sqrt(ops.sum(ops.square(flat), axis=-1, keepdims=True)), 1e-12)


def attention_transfer(student_features: tf.Tensor, teacher_features: tf.Tensor) -> tf.Tensor:
    """AT (Zagoruyko & Komodakis 2017) for one stage: mean squared distance of attention maps,
    as RepDistiller computes it (the 1000 weight is applied by the method)."""
    return ops.mean(ops.square(attention_map(student_features) - attention_map(teacher_features)))


def discriminator_loss(real_logits: tf.Tensor, fake_logits: tf.Tensor, kind: str = "lsgan") -> tf.Tensor:
    """The discriminator's loss: teacher features are real (1), adapted student features fake (0).

    ``lsgan``: ``mean((D(real) - 1)^2) + mean(D(fake)^2)``; ``bce``: the sum of the two binary
    cross-entropies on logits.
    """
    if kind == "lsgan":
        return ops.mean(ops.square(real_logits - 1.0)) + ops.mean(ops.square(fake_logits))
    return (ops.mean(keras.losses.binary_crossentropy(ops.ones_like(real_logits), real_logits, from_logits=True))
            + ops.mean(keras.losses.binary_crossentropy(ops.zeros_like(fake_logits), fake_logits, from_logits=True)))


def adversarial(fake_logits: tf.Tensor, kind: str = "lsgan") -> tf.Tensor:
    """The student's adversarial loss: fool the discriminator (``lsgan``: ``mean((D(fake) - 1)^2)``,
    ``bce``: the non-saturating ``-log sigmoid(D(fake))``)."""
    if kind == "lsgan":
        return ops.mean(ops.square(fake_logits - 1.0))
    return ops.mean(keras.losses.binary_crossentropy(ops.ones_like(fake_logits), fake_logits, from_logits=True))


def judged_real(logits: tf.Tensor, kind: str = "lsgan") -> tf.Tensor:
    """1.0 where the discriminator calls a feature map real (LSGAN: output > 0.5; BCE: logit > 0)."""
    return ops.cast(logits > (0.5 if kind == "lsgan" else 0.0), "float32")
