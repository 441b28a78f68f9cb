"""``nkd``: normalized knowledge distillation (Yang et al., ICCV 2023, "From Knowledge
Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized Loss and
Customized Soft Labels"), as its authors' code (yzd-v/cls_KD, ``nkd.py``) computes it:
``CE + L_target + L_non-target``.

``L_target = -mean_b(p_t[y] * log p_s[y])`` at temperature 1 with the teacher's target
probability as a constant weight; ``L_non-target = -gamma T^2 mean_b(sum_k q_t[k] log q_s[k])``
where ``q`` is the softmax at temperature T over the non-target classes only (the target class
removed and the rest renormalized: the "normalized" non-target distribution). Defaults are the
authors' CIFAR-100 config (T 3, gamma 3.5); their ImageNet ones are T 1, gamma 1.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tfkd.distill.terms import LogitTerm
from tfkd.options import non_negative, option, positive

NAME = "nkd"
SUMMARY = "CE + teacher-weighted target CE + gamma T^2 CE of renormalized non-target classes, T 3, gamma 3.5"


@dataclass
class Options:
    """``distill.nkd.*``"""

    temperature: float = option(3.0, "temperature T of the non-target term (the authors' CIFAR-100 "
                                     "config; ImageNet: 1)", **positive())
    gamma: float = option(3.5, "weight of the non-target term (CIFAR-100 config; ImageNet: 1.5)",
                          **non_negative())
    ce_weight: float = option(1.0, "cross-entropy weight", **non_negative())


def nkd_loss(teacher_logits: Any, student_logits: Any, labels: Any, temperature: float, gamma: float) -> Any:
    """``L_target + L_non-target`` averaged over the batch (see the module docstring)."""
    from keras import ops

    classes = ops.shape(student_logits)[-1]
    target = ops.one_hot(ops.cast(labels, "int32"), classes, dtype=student_logits.dtype)
    log_p_s = ops.log_softmax(student_logits, axis=-1)
    p_t = ops.stop_gradient(ops.softmax(teacher_logits, axis=-1))
    target_term = -ops.mean(ops.sum(target * p_t, -1) * ops.sum(target * log_p_s, -1))
    # the target's logit pushed to -1000 after scaling: its probability underflows to exactly 0,
    # which is the softmax over the other K - 1 classes
    log_q_s = ops.log_softmax(student_logits / temperature - 1000.0 * target, axis=-1)
    q_t = ops.stop_gradient(ops.softmax(teacher_logits / temperature - 1000.0 * target, axis=-1))
    non_target_term = -gamma * temperature**2 * ops.mean(ops.sum(q_t * log_q_s * (1 - target), -1))
    return target_term + non_target_term


class NKD(LogitTerm):
    """The NKD term (its target and non-target parts)."""

    name = "nkd"

    def __init__(self, temperature: float, gamma: float, teacher: str = "teacher") -> None:
        super().__init__(1.0, teacher, temperature)
        self.gamma = float(gamma)

    def compute(self, batch: Any) -> Any:
        t, s = self.logits(batch)
        return nkd_loss(t, s, batch.labels, self.temperature, self.gamma)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "gamma": self.gamma}


def terms(options: Options, run: Any) -> list[Any]:
    """CE and NKD."""
    from tfkd.distill.terms import CrossEntropy

    return [CrossEntropy(options.ce_weight), NKD(options.temperature, options.gamma)]
