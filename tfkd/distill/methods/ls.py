"""``ls``: logit standardization (Sun et al., CVPR 2024), a modifier: ``kd+ls``, ``dkd+ls``,
``cft+ls``. Every logit term of the methods before it z-scores the teacher's and the student's
logits per example (``(z - mean) / (std + 1e-7)``) before its temperature-softmax, at the
authors' base temperature 2 and with their weight: KD's weight becomes 9 (their ``--kd-weight
9``), DKD's alpha and beta are multiplied by 9; other logit terms keep their weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tfkd.options import non_negative, option, positive

NAME = "ls"
SUMMARY = "modifier: z-score the logits of every logit term (kd+ls, dkd+ls), temperature 2, weight 9"
TEACHERS: tuple[str, ...] = ()


@dataclass
class Options:
    """``distill.ls.*``"""

    temperature: float = option(2.0, "the logit terms' temperature after standardization (the "
                                     "authors' base temperature)", **positive())
    weight: float = option(9.0, "KD's weight (DKD: the factor of alpha and beta), the authors' "
                                "--kd-weight", **non_negative())


def modify(terms: list[Any], options: Options) -> None:
    """Standardizes every logit term; refuses a method without one."""
    from tfkd.distill.terms import LogitTerm
    from tfkd.errors import ConfigError

    logit_terms = [t for t in terms if isinstance(t, LogitTerm)]
    if not logit_terms:
        raise ConfigError("method ls: the methods before it have no logit term to standardize "
                          "(e.g. kd+ls, dkd+ls)")
    for term in logit_terms:
        term.apply_standardization(options.temperature, options.weight)
