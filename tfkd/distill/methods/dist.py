"""``dist``: knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022), as its
authors' CIFAR setting runs it (hunto/image_classification_sota, ``dist_cifar.yaml``):
``CE + 2 * tau^2 * (beta * inter + gamma * intra)``, tau 4, beta = gamma = 1.

With ``p = softmax(z / tau)`` per example, the inter-class relation is ``1 - mean over examples of
the Pearson correlation of p_s and p_t across classes``, the intra-class relation the same across
the examples of each class (the batch transposed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tfkd.distill.terms import LogitTerm
from tfkd.options import non_negative, option, positive

NAME = "dist"
SUMMARY = "CE + 2 tau^2 (inter-class + intra-class Pearson relation loss), tau 4"


@dataclass
class Options:
    """``distill.dist.*``"""

    weight: float = option(2.0, "weight of the DIST term (the authors' kd_loss_weight on CIFAR)", **non_negative())
    beta: float = option(1.0, "weight of the inter-class relation", **non_negative())
    gamma: float = option(1.0, "weight of the intra-class relation", **non_negative())
    temperature: float = option(4.0, "temperature tau (the authors' dist_t4 on CIFAR)", **positive())
    ce_weight: float = option(1.0, "cross-entropy weight", **non_negative())


def pearson(a: Any, b: Any, eps: float = 1e-8) -> Any:
    """Per-row Pearson correlation of two (N, C) matrices (the authors' eps in the denominator)."""
    from keras import ops

    a = a - ops.mean(a, axis=1, keepdims=True)
    b = b - ops.mean(b, axis=1, keepdims=True)
    return ops.sum(a * b, 1) / (ops.sqrt(ops.sum(a * a, 1)) * ops.sqrt(ops.sum(b * b, 1)) + eps)


def dist_loss(teacher_logits: Any, student_logits: Any, beta: float, gamma: float, tau: float,
              gather: Any = None) -> Any:
    """``tau^2 * (beta * inter + gamma * intra)``. The intra-class relation is a statistic of the
    batch: ``gather`` (``terms.global_batch``) gives it the global batch under MirroredStrategy."""
    from keras import ops

    p_s = ops.softmax(student_logits / tau, axis=-1)
    p_t = ops.softmax(teacher_logits / tau, axis=-1)
    inter = 1.0 - ops.mean(pearson(p_s, p_t))
    if gather is not None:
        p_s, p_t = gather(p_s), gather(p_t)
    intra = 1.0 - ops.mean(pearson(ops.transpose(p_s), ops.transpose(p_t)))
    return tau**2 * (beta * inter + gamma * intra)


class DIST(LogitTerm):
    """The DIST term."""

    name = "dist"

    def __init__(self, weight: float, beta: float, gamma: float, temperature: float, teacher: str = "teacher") -> None:
        super().__init__(weight, teacher, temperature)
        self.beta, self.gamma = float(beta), float(gamma)

    def compute(self, batch: Any) -> Any:
        from tfkd.distill.terms import global_batch

        t, s = self.logits(batch)
        return dist_loss(t, s, self.beta, self.gamma, self.temperature, global_batch)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "beta": self.beta, "gamma": self.gamma}


def terms(options: Options, run: Any) -> list[Any]:
    """CE and DIST."""
    from tfkd.distill.terms import CrossEntropy

    return [CrossEntropy(options.ce_weight),
            DIST(options.weight, options.beta, options.gamma, options.temperature)]
