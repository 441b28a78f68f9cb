"""``ofd``: overhaul of feature distillation (Heo et al., ICCV 2019; the seed paper cites it), as
mdistiller computes it: ``CE + 0.001 * sum over stages of partial-L2(C(F_s), F_t) / 2^(n-1-i)``.

Features are the teacher's pre-ReLU stage outputs (the zoo's ``preact`` outputs, no extra
compute); the student's pre-ReLU outputs pass a 1x1 conv + BN connector. The teacher map is
average-pooled to the student's size. Partial L2 counts a difference only where it matters after
the teacher's ReLU: where the teacher is positive, or the student exceeds a non-positive teacher,
with the teacher's negative values replaced by a margin per channel, the expectation of the
pre-ReLU value given that it is negative, from the batch norm before it (mean beta, std |gamma|).

The teacher runs as the authors' does (mdistiller's ``OFD`` never puts it in eval mode): its batch
norm normalizes by each batch's statistics, not by its moving averages (``teacher_bn: moving``
for the frozen teacher of every other method). Its weights never change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tfkd.distill.terms import Term, resolve_stages
from tfkd.options import non_negative, option

NAME = "ofd"
SUMMARY = "CE + 0.001 * partial L2 of connected pre-ReLU features, margin from the teacher's batch norm"


@dataclass
class Options:
    """``distill.ofd.*``"""

    weight: float = option(0.001, "weight of the feature term (mdistiller's FEAT_WEIGHT)", **non_negative())
    ce_weight: float = option(1.0, "cross-entropy weight", **non_negative())
    teacher_bn: str = option("batch", "the teacher's batch norm: batch (its authors' teacher in training "
                                      "mode: each batch's statistics) or moving (its moving averages)",
                             valid=lambda v: v in ("batch", "moving"), expected="batch or moving")


def margins(gamma: Any, beta: Any) -> list[float]:
    """``E[x | x < 0]`` for ``x ~ N(beta, gamma^2)`` per channel (``-3 |gamma|`` where the
    probability of a negative value is under 0.001), as OFD's authors compute it."""
    found = []
    for g, m in zip(gamma, beta):
        s, m = abs(float(g)), float(m)
        cdf = 0.5 * math.erfc(m / s / math.sqrt(2.0)) if s > 0 else 0.0  # P(x < 0) = Phi(-m / s)
        if cdf > 0.001:
            found.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf + m)
        else:
            found.append(-3 * s)
    return found


def partial_l2(source: Any, target: Any, margin: Any) -> Any:
    """OFD's distance: per example the sum over the map, then the mean over the batch."""
    from keras import ops

    hinge = ops.cast((source > margin) & (target <= margin), source.dtype)
    below = ops.cast((source > target) & (target > margin) & (target <= 0), source.dtype)
    above = ops.cast(target > 0, source.dtype)
    loss = ops.square(source - margin) * hinge + ops.square(source - target) * (below + above)
    return ops.sum(ops.mean(ops.abs(loss), axis=0))


def batch_norm_before(model: Any, tensor: Any) -> Any:
    """The batch norm whose output reaches ReLU as ``tensor``: the tensor's own producer, a
    batch norm added to a shortcut into it (a ResNet block's last), or the batch norm that reads
    it next (a pre-activation block's first, as in wide ResNets)."""
    from tfkd.errors import ModelError

    layer = tensor._keras_history[0]
    if type(layer).__name__ == "BatchNormalization":
        return layer
    for node in layer._inbound_nodes[:1]:
        for parent in node.parent_nodes:
            if type(parent.operation).__name__ == "BatchNormalization":
                return parent.operation
    for node in layer._outbound_nodes:
        if type(node.operation).__name__ == "BatchNormalization":
            return node.operation
    raise ModelError(f"ofd: no batch norm before the ReLU after {layer.name} in {model.name} (OFD "
                     "takes its margin from the batch norm before each pre-ReLU feature)")


class OFDTerm(Term):
    """Connectors and margins for every aligned stage pair."""

    name = slot = "ofd"

    def build(self, ctx: Any) -> None:
        import keras
        import numpy as np

        from tfkd.models.common import batch_norm
        from tfkd.models.wrap import unwrap

        teacher = unwrap(ctx.teacher(self.teacher))
        self.pairs = resolve_stages("all", ctx.student, teacher)
        s_shapes, t_shapes = ctx.shapes(ctx.student, "preact"), ctx.shapes(teacher, "preact")
        self.connectors, self.margins = [], []
        for s, t in self.pairs:
            connector = keras.Sequential([
                keras.layers.Conv2D(t_shapes[t][-1], 1, use_bias=False, kernel_initializer=keras.initializers.HeNormal()),
                batch_norm(keras, ctx.sync_bn)], name=f"ofd_connector_s{s + 1}")
            connector.build((None, *s_shapes[s]))
            self.connectors.append(connector)
            bn = batch_norm_before(teacher, teacher.output["preact"][t])
            self.margins.append(np.asarray(margins(bn.gamma.numpy(), bn.beta.numpy()), np.float32))
        self.layers = list(self.connectors)

    def compute(self, batch: Any) -> Any:
        from keras import ops

        s_pre, t_pre = batch.student["preact"], batch.teachers[self.teacher]["preact"]
        total, n = 0.0, len(self.pairs)
        for i, ((s, t), connector, margin) in enumerate(zip(self.pairs, self.connectors, self.margins)):
            source = connector(s_pre[s], training=batch.training)
            target = t_pre[t]
            if tuple(target.shape[1:3]) != tuple(source.shape[1:3]):
                import tensorflow as tf

                target = tf.image.resize(target, source.shape[1:3], method="area")
            total = total + partial_l2(source, ops.stop_gradient(target), margin) / 2 ** (n - i - 1)
        return total


def terms(options: Options, run: Any) -> list[Any]:
    """CE and OFD's feature term."""
    from tfkd.distill.terms import CrossEntropy

    term = OFDTerm(options.weight)
    term.teacher_batch_statistics = options.teacher_bn == "batch"
    return [CrossEntropy(options.ce_weight), term]
