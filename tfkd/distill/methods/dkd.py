"""``dkd``: decoupled knowledge distillation (Zhao et al., CVPR 2022), as its authors' code
(mdistiller) computes it: ``CE + warm-up * (alpha TCKD + beta NCKD)``.

TCKD is the binary KL between teacher and student of (target class, all other classes), NCKD the
KL among the non-target classes only (the target masked out), both at temperature T and times
T^2. CIFAR defaults: alpha 1, beta 8, T 4, a linear warm-up over the first 20 epochs (epoch e
weighs min(e / 20, 1), epochs counted from 1; a warm-up under one epoch rises every step, see
``tfkd.distill.terms.linear_warmup``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tfkd.distill.terms import LogitTerm, linear_warmup
from tfkd.options import non_negative, option, positive

NAME = "dkd"
SUMMARY = "CE + alpha TCKD + beta NCKD (decoupled KD), alpha 1, beta 8, T 4, 20-epoch warm-up"


@dataclass
class Options:
    """``distill.dkd.*``"""

    alpha: float = option(1.0, "weight of the target-class term TCKD", **non_negative())
    beta: float = option(8.0, "weight of the non-target-class term NCKD", **non_negative())
    temperature: float = option(4.0, "temperature T", **positive())
    warmup_epochs: float = option(20.0, "epochs of linear warm-up of the DKD term, rising once per epoch "
                                  "(under 1: every step; 0: none)", **non_negative())
    ce_weight: float = option(1.0, "cross-entropy weight", **non_negative())


def dkd_loss(teacher_logits: Any, student_logits: Any, labels: Any, alpha: float, beta: float,
             temperature: float) -> Any:
    """``alpha TCKD + beta NCKD`` averaged over the batch."""
    from keras import ops

    return ops.mean(dkd_per_example(teacher_logits, student_logits, labels, alpha, beta, temperature))


def dkd_per_example(teacher_logits: Any, student_logits: Any, labels: Any, alpha: float, beta: float,
                    temperature: float) -> Any:
    """``T^2 (alpha TCKD + beta NCKD)`` of each row, shape (N,) (SDD weighs regions' rows)."""
    from keras import ops

    classes = ops.shape(student_logits)[-1]
    target = ops.one_hot(ops.cast(labels, "int32"), classes, dtype=student_logits.dtype)
    p_s = ops.softmax(student_logits / temperature, axis=-1)
    p_t = ops.softmax(teacher_logits / temperature, axis=-1)
    b_s = ops.stack([ops.sum(p_s * target, -1), ops.sum(p_s * (1 - target), -1)], axis=-1)
    b_t = ops.stack([ops.sum(p_t * target, -1), ops.sum(p_t * (1 - target), -1)], axis=-1)
    tckd = ops.sum(b_t * (ops.log(b_t) - ops.log(b_s)), -1)
    masked_t = ops.log_softmax(teacher_logits / temperature - 1000.0 * target, axis=-1)
    masked_s = ops.log_softmax(student_logits / temperature - 1000.0 * target, axis=-1)
    nckd = ops.sum(ops.exp(masked_t) * (masked_t - masked_s), -1)
    return temperature**2 * (alpha * tckd + beta * nckd)


class DKD(LogitTerm):
    """The DKD term, warmed up linearly over ``warmup_epochs``."""

    name = "dkd"

    def __init__(self, alpha: float, beta: float, temperature: float, warmup_epochs: float,
                 steps_per_epoch: int, teacher: str = "teacher") -> None:
        super().__init__(1.0, teacher, temperature)
        self.alpha, self.beta = float(alpha), float(beta)
        self.warmup_epochs, self.steps_per_epoch = float(warmup_epochs), int(steps_per_epoch)

    def compute(self, batch: Any) -> Any:
        t, s = self.logits(batch)
        return dkd_loss(t, s, batch.labels, self.alpha, self.beta, self.temperature)

    def weight_at(self, step: Any) -> Any:
        return linear_warmup(self.weight, self.warmup_epochs, self.steps_per_epoch, step)

    def apply_standardization(self, temperature: float, weight: float) -> None:
        """The authors' DKD + logit standardization: alpha and beta times ``weight``, their base
        temperature."""
        self.standardize, self.temperature = True, float(temperature)
        self.alpha, self.beta = self.alpha * weight, self.beta * weight

    def config(self) -> dict[str, Any]:
        return {**super().config(), "alpha": self.alpha, "beta": self.beta,
                "warmup_epochs": self.warmup_epochs}


def terms(options: Options, run: Any) -> list[Any]:
    """CE and DKD."""
    from tfkd.distill.terms import CrossEntropy

    return [CrossEntropy(options.ce_weight), DKD(options.alpha, options.beta, options.temperature,
                                                  options.warmup_epochs, run.steps_per_epoch)]
