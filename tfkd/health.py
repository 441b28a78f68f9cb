"""Is a trained model a working model? The checks a run makes of its own accuracy before it
calls itself done, so that a broken model is named where the user looks (the last line of the
command, ``metrics.json``, the model card) instead of being exported and verified as if fine.

Two symptoms are named:

- **near chance**: top-1 within a tenth of the way from the majority class's share (what
  predicting one class scores) to 100%;
- **far below training**: top-1 at inference under half the training accuracy (measured in
  training mode, on augmented batches), with training itself clear of chance: the model has
  learned, but does not work at inference (batch-norm statistics, a train/test pipeline
  mismatch).

Plain Python: no TensorFlow.
"""

from __future__ import annotations

from typing import Any, Sequence

#: Share of the way from chance to 100% top-1 below which a model is "near chance".
NEAR_CHANCE = 0.1
#: Inference top-1 below this fraction of the training accuracy is "far below".
FAR_BELOW = 0.5


def chance_rate(labels: Sequence[int]) -> float:
    """Top-1 of always predicting the most frequent class of ``labels``."""
    counts: dict[int, int] = {}
    for label in labels:
        counts[int(label)] = counts.get(int(label), 0) + 1
    return max(counts.values()) / len(labels) if counts else 0.0


def near_chance(top1: float, chance: float) -> bool:
    """True when ``top1`` is within ``NEAR_CHANCE`` of the way from ``chance`` to 1."""
    return top1 < chance + NEAR_CHANCE * (1.0 - chance)


def accuracy_warnings(what: str, top1: float | None, labels: Sequence[int], split: str,
                      train_top1: float | None = None) -> list[str]:
    """One sentence per symptom of ``what`` (e.g. "the student") scoring ``top1`` on ``split``
    (whose labels are ``labels``), trained to ``train_top1``; empty when it looks healthy or
    when there is nothing to judge it on."""
    if top1 is None or not len(labels):
        return []
    chance = chance_rate(labels)
    found = []
    if near_chance(top1, chance):
        found.append(f"{what} scores {top1:.1%} top-1 on the {split} split, near chance "
                     f"({chance:.1%}: always predicting its most frequent class)"
                     + (f" although it reached {train_top1:.1%} in training" if train_top1 else ""))
    elif (train_top1 is not None and not near_chance(train_top1, chance)
          and top1 < FAR_BELOW * train_top1):
        found.append(f"{what} scores {top1:.1%} top-1 on the {split} split, far below its "
                     f"{train_top1:.1%} in training: it does not work at inference")
    return found


def describe(warnings: Sequence[str]) -> str:
    """The warnings as one line (empty when there are none)."""
    return "; ".join(warnings)


def collect(*records: Any) -> list[str]:
    """The ``warnings`` of several stage records, in order, each once."""
    found: list[str] = []
    for record in records:
        for warning in (record or {}).get("warnings", []):
            if warning not in found:
                found.append(warning)
    return found
