"""``cft``: complementary feature transfer from one reconstruction-augmented teacher (the seed
conference paper, 2020): ``c CE + gamma KD + alpha MSE(ConvBlock(F_s), F_t) + beta adversarial``,
c = 1, gamma = 0.9, alpha = 1, beta = 0.1 (METHOD.md; gamma tuned, see benchmarks/README.md)."""

from __future__ import annotations

from typing import Any

from tfkd.distill.methods._complementary import Options, complementary_terms

NAME = "cft"
SUMMARY = "c CE + alpha MSE(ConvBlock(F_s), F_t) + beta adversarial + gamma KD, c = 1, alpha = 1, beta = 0.1, gamma = 0.9"
TEACHERS = ("reconstruction",)
__all__ = ["Options", "terms"]


def terms(options: Options, run: Any) -> list[Any]:
    """Every term reads the one teacher; the feature and adversarial terms share its adapters."""
    return complementary_terms(options, run, "reconstruction", "reconstruction", NAME)
