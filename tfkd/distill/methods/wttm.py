"""``wttm``: weighted transformed teacher matching (Zheng and Yang, ICLR 2024, "Knowledge
Distillation Based on Transformed Teacher Matching"), as its authors' code (zkxufo/TTM,
``distiller_zoo/wttm.py``) computes it: ``CE + beta * mean_b(U_b * KL(p~_t || p_s))``.

The teacher's probabilities are power-transformed, ``p_t ** gamma`` (gamma = 1/T: temperature
scaling on the teacher side only), and renormalized to ``p~_t``; the student's are not scaled
at all (temperature 1); ``U_b = sum_k p_t[b, k] ** gamma`` weighs each example (sample-adaptive:
a flat teacher distribution weighs more). No T^2 factor. The repository gives no default beta and
its per-pair table (the paper's appendix A.4) was not reachable here: the defaults are the
WTTM setting of the authors' README (gamma 0.2, weight 4, vgg13 -> vgg8 next to CRD).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tfkd.distill.terms import LogitTerm
from tfkd.options import non_negative, option, positive

NAME = "wttm"
SUMMARY = "CE + beta mean(U * KL(normalized p_t^gamma || p_s)), U = sum p_t^gamma, gamma 0.2, beta 4"


@dataclass
class Options:
    """``distill.wttm.*``"""

    gamma: float = option(0.2, "power of the teacher's probabilities, 1/T (the authors' --ttm_l)", **positive())
    beta: float = option(4.0, "weight of the WTTM term", **non_negative())
    ce_weight: float = option(1.0, "cross-entropy weight", **non_negative())


def wttm_loss(teacher_logits: Any, student_logits: Any, gamma: float) -> Any:
    """``mean_b(U_b * KL(p~_t || p_s))`` (see the module docstring), computed in log space."""
    from keras import ops

    log_p_s = ops.log_softmax(student_logits, axis=-1)
    powered = gamma * ops.log_softmax(teacher_logits, axis=-1)  # log p_t^gamma
    log_u = ops.logsumexp(powered, axis=-1, keepdims=True)  # log sum_k p_t^gamma
    log_q_t = powered - log_u
    kl = ops.sum(ops.exp(log_q_t) * (log_q_t - log_p_s), axis=-1)
    return ops.mean(ops.stop_gradient(ops.exp(log_u[:, 0])) * kl)


class WTTM(LogitTerm):
    """The WTTM term."""

    name = "wttm"

    def __init__(self, beta: float, gamma: float, teacher: str = "teacher") -> None:
        super().__init__(beta, teacher, 1.0 / gamma)
        self.gamma = float(gamma)

    def compute(self, batch: Any) -> Any:
        t, s = self.logits(batch)
        return wttm_loss(t, s, self.gamma)

    def apply_standardization(self, temperature: float, weight: float) -> None:
        """Standardized logits, the teacher's power at ``1 / temperature``."""
        self.standardize, self.temperature, self.gamma = True, float(temperature), 1.0 / float(temperature)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "gamma": self.gamma}


def terms(options: Options, run: Any) -> list[Any]:
    """CE and WTTM."""
    from tfkd.distill.terms import CrossEntropy

    return [CrossEntropy(options.ce_weight), WTTM(options.beta, options.gamma)]
