"""``at``: Zagoruyko & Komodakis 2017, CE + 1000 * the sum over stages of the attention-transfer
distance (RepDistiller's weight); the stages must have equal spatial sizes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tfkd.distill.terms import Term, resolve_stages
from tfkd.options import non_negative, option

NAME = "at"
SUMMARY = "CE + 1000 * sum over stages of the attention-transfer distance"


@dataclass
class Options:
    """``distill.at.*``"""

    weight: float = option(1000.0, "attention-transfer weight", **non_negative())


class AttentionTransfer(Term):
    """Attention maps (``mean_c F^2``, L2-normalized) of every aligned stage pair."""

    name = slot = "at"

    def build(self, ctx: Any) -> None:
        from tfkd.errors import ModelError

        teacher = ctx.teacher(self.teacher)
        self.pairs = resolve_stages("all", ctx.student, teacher)
        s_shapes, t_shapes = ctx.shapes(ctx.student), ctx.shapes(teacher)
        for s, t in self.pairs:
            if s_shapes[s][:2] != t_shapes[t][:2]:
                raise ModelError(f"attention transfer needs equal spatial sizes: {ctx.student.name} "
                                 f"stage {s + 1} is {s_shapes[s][:2]}, {teacher.name} stage "
                                 f"{t + 1} is {t_shapes[t][:2]}")

    def compute(self, batch: Any) -> Any:
        from keras import ops

        from tfkd import losses

        s_feats, t_feats = batch.student["features"], batch.teachers[self.teacher]["features"]
        return ops.sum(ops.stack([losses.attention_transfer(s_feats[s], t_feats[t]) for s, t in self.pairs]))


def terms(options: Options, run: Any) -> list[Any]:
    """CE and attention transfer."""
    from tfkd.distill.terms import CrossEntropy

    return [CrossEntropy(1.0), AttentionTransfer(options.weight)]
