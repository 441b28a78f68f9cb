"""``fitnet``: Romero et al. 2015, CE + w * MSE(ConvBlock(student middle stage), teacher middle
stage), w = 100 (RepDistiller's hint weight). The regressor is conv + BN + ReLU, RepDistiller's
and mdistiller's ``ConvReg``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tfkd.distill.terms import Term
from tfkd.options import non_negative, option

NAME = "fitnet"
SUMMARY = "CE + 100 * MSE(ConvBlock(student middle stage), teacher middle stage)"


@dataclass
class Options:
    """``distill.fitnet.*``"""

    weight: float = option(100.0, "hint-loss weight (RepDistiller's)", **non_negative())
    adapter_relu: bool = option(True, "end the ConvBlock adapter with a ReLU (the authors' ConvReg; "
                                      "false: conv + BN only)")


class Hint(Term):
    """MSE of the adapted student middle stage to the teacher's middle stage."""

    name = slot = "hint"

    def __init__(self, weight: float, teacher: str = "teacher", adapter_relu: bool = False) -> None:
        super().__init__(weight, teacher)
        self.adapter_relu = bool(adapter_relu)

    def build(self, ctx: Any) -> None:
        from tfkd.distill.adapters import ConvBlock

        s_shapes, t_shapes = ctx.shapes(ctx.student), ctx.shapes(ctx.teacher(self.teacher))
        self.pair = (len(s_shapes) // 2, len(t_shapes) // 2)
        self.adapter = ConvBlock(t_shapes[self.pair[1]], ctx.sync_bn, self.adapter_relu, name="hint_adapter")
        self.adapter.build((None, *s_shapes[self.pair[0]]))
        self.layers = [self.adapter]

    def compute(self, batch: Any) -> Any:
        from tfkd import losses

        s, t = self.pair
        return losses.feature(self.adapter(batch.student["features"][s], training=batch.training),
                              batch.teachers[self.teacher]["features"][t])


def terms(options: Options, run: Any) -> list[Any]:
    """CE and the hint term."""
    from tfkd.distill.terms import CrossEntropy

    return [CrossEntropy(1.0), Hint(options.weight, adapter_relu=options.adapter_relu)]
