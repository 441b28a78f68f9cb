"""``mktn``: multifarious knowledge transfer from two complementary teachers (the seed journal
paper, 2024): the terms of complementary transfer, the adversarial term against Teacher1 (an
autoencoder: reconstruction only), the feature and KD terms from Teacher2 (a plain classifier)."""

from __future__ import annotations

from typing import Any

from tfkd.distill.methods._complementary import Options, complementary_terms

NAME = "mktn"
SUMMARY = "as cft; feature and KD terms from Teacher2 (classifier), adversarial term from Teacher1 (autoencoder)"
TEACHERS = ("autoencoder", "classifier")
__all__ = ["Options", "terms"]


def terms(options: Options, run: Any) -> list[Any]:
    """Teacher1 (given first) is the discriminators' real; Teacher2 feeds KD and the feature term."""
    return complementary_terms(options, run, "classifier", "autoencoder", NAME)
