"""``ctkd``: curriculum temperature for knowledge distillation (Li et al., AAAI 2023), as its
authors' code (zhengli97/CTKD: ``models/temp_global.py``, ``helper/loops.py``) computes it, with
the global temperature: ``0.1 CE + 0.9 T^2 KL(softmax(t / T) || softmax(s / T))``.

``T = t_start + t_end * sigmoid(GRL(g))`` with one learnable scalar ``g`` (initial 1, so T starts
near 15.6), trained with the student (its optimizer, learning rate and weight decay). The gradient
reversal layer passes ``lambda * grad`` back to ``g``; ``lambda`` follows a cosine from 0 at the
start to -1 after 10 epochs and stays there, so the temperature climbs the KD loss ever more
strongly (the curriculum: harder and harder targets), while the student descends it. Epochs are
counted from 1, as the authors' loop does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tfkd.distill.terms import LogitTerm
from tfkd.options import non_negative, option, positive

NAME = "ctkd"
SUMMARY = "0.1 CE + 0.9 T^2 KL at a learnable temperature T in (1, 21) trained adversarially, cosine curriculum"


@dataclass
class Options:
    """``distill.ctkd.*``"""

    kd_weight: float = option(0.9, "weight of the KD term", **non_negative())
    ce_weight: float = option(0.1, "cross-entropy weight", **non_negative())
    t_start: float = option(1.0, "lowest temperature", **positive())
    t_end: float = option(20.0, "temperature range above t_start", **positive())
    lambda_max: float = option(0.0, "gradient-reversal factor at the start", lambda v: v <= 0, "<= 0")
    lambda_min: float = option(-1.0, "gradient-reversal factor after the curriculum", lambda v: v <= 0, "<= 0")
    curriculum_epochs: float = option(10.0, "epochs of the cosine from lambda_max to lambda_min", **positive())


def reversal_factor(step: Any, steps_per_epoch: int, curriculum_epochs: float, lambda_max: float,
                    lambda_min: float) -> Any:
    """``lambda`` at the 0-based optimizer ``step``: ``lambda_min + (lambda_max - lambda_min)
    (cos(pi min(e, E) / E) + 1) / 2`` at the 1-based epoch ``e``."""
    from keras import ops

    epoch = ops.cast(ops.floor_divide(step, steps_per_epoch) + 1, "float32")
    progress = ops.minimum(epoch, curriculum_epochs) / curriculum_epochs
    return lambda_min + (lambda_max - lambda_min) * (ops.cos(math.pi * progress) + 1.0) / 2.0


def reverse_gradient(x: Any, factor: Any) -> Any:
    """The identity, whose gradient is ``factor`` times the incoming one (negative: reversed)."""
    import tensorflow as tf

    @tf.custom_gradient
    def reversal(value: Any) -> Any:
        def grad(upstream: Any) -> Any:
            return tf.cast(factor, upstream.dtype) * upstream
        return tf.identity(value), grad

    return reversal(tf.convert_to_tensor(x))  # a variable read outside: its gradient flows on


def kd_at(teacher_logits: Any, student_logits: Any, temperature: Any) -> Any:
    """``T^2 KL(softmax(t / T) || softmax(s / T))`` averaged over the batch, ``T`` a tensor."""
    from keras import ops

    t = ops.log_softmax(teacher_logits / temperature, axis=-1)
    s = ops.log_softmax(student_logits / temperature, axis=-1)
    return temperature**2 * ops.mean(ops.sum(ops.exp(t) * (t - s), axis=-1))


class CurriculumKD(LogitTerm):
    """KD at the learnable temperature, its gradient reversed for the temperature."""

    name = "ctkd"

    def __init__(self, weight: float, options: Options, steps_per_epoch: int, teacher: str = "teacher") -> None:
        super().__init__(weight, teacher, options.t_start)
        self.options, self.steps_per_epoch = options, int(steps_per_epoch)

    def build(self, ctx: Any) -> None:
        import keras

        class GlobalTemperature(keras.layers.Layer):
            def build(self, input_shape: Any = None) -> None:
                self.value = self.add_weight(shape=(), initializer=keras.initializers.Constant(1.0),
                                             name="ctkd_g")
                self.built = True

        self.parameter = GlobalTemperature(name="ctkd_temperature")
        self.parameter.build()
        self.layers = [self.parameter]

    def temperature_at(self, step: Any) -> Any:
        """``T`` this step, through the gradient reversal."""
        from keras import ops

        o = self.options
        factor = reversal_factor(step, self.steps_per_epoch, o.curriculum_epochs, o.lambda_max, o.lambda_min)
        return o.t_start + o.t_end * ops.sigmoid(reverse_gradient(self.parameter.value, factor))

    def compute(self, batch: Any) -> Any:
        from keras import ops

        t, s = self.logits(batch)
        return kd_at(t, s, ops.cast(self.temperature_at(batch.step), s.dtype))

    def config(self) -> dict[str, Any]:
        o = self.options
        return {**super().config(), "t_start": o.t_start, "t_end": o.t_end, "lambda_max": o.lambda_max,
                "lambda_min": o.lambda_min, "curriculum_epochs": o.curriculum_epochs}


def terms(options: Options, run: Any) -> list[Any]:
    """CE and KD at the curriculum temperature."""
    from tfkd.distill.terms import CrossEntropy

    return [CrossEntropy(options.ce_weight), CurriculumKD(options.kd_weight, options, run.steps_per_epoch)]
