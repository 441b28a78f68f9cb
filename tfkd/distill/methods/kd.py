"""``kd``: Hinton et al. 2015, ``(1 - a) CE + a tau^2 KL(softmax(t / tau) || softmax(s / tau))``,
a = 0.9, tau = 4 (mdistiller's and RepDistiller's CIFAR setting)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tfkd.options import option, positive

NAME = "kd"
SUMMARY = "(1 - a) CE + a tau^2 KL(softmax(t/tau) || softmax(s/tau)), a = 0.9, tau = 4"


@dataclass
class Options:
    """``distill.kd.*``"""

    alpha: float = option(0.9, "weight a of the KD term; CE gets 1 - a", lambda v: 0 <= v <= 1, "in [0, 1]")
    temperature: float = option(4.0, "KD temperature tau", **positive())


def terms(options: Options, run: Any) -> list[Any]:
    """CE and KD, weighted ``1 - a`` and ``a``."""
    from tfkd.distill.terms import KD, CrossEntropy

    return [CrossEntropy(1.0 - options.alpha), KD(options.alpha, temperature=options.temperature)]
