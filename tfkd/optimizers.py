"""The SGD every stage trains with: its learning-rate schedule and its weight decay.

Two weight-decay rules (``*.optimizer.weight_decay_mode``):

- ``coupled``: L2 regularization in the gradient, ``g + wd * w``, before momentum: PyTorch's
  ``SGD(weight_decay=)``, and so the recipe behind every published KD number. With momentum
  ``m`` a weight whose loss gradient is zero shrinks by about ``lr * wd / (1 - m)`` a step.
- ``decoupled``: Keras's ``SGD(weight_decay=)``, ``w -= lr * wd * w`` each step beside the
  momentum update: about ``1 - m`` times (10x at m 0.9) weaker for the same ``wd``.

``CoupledSGD`` is Keras's SGD with the coupled rule; it saves and loads like any Keras optimizer.
"""

from __future__ import annotations

from typing import Any

import keras

from tfkd.config import WEIGHT_DECAY_MODES


@keras.saving.register_keras_serializable(package="tfkd")
class CoupledSGD(keras.optimizers.SGD):
    """``keras.optimizers.SGD`` whose weight decay is L2 in the gradient (``l2 * w`` added to each
    variable's gradient before the momentum update), as PyTorch's SGD. Every trainable variable
    is decayed (the field's recipes decay biases and batch-norm scales too)."""

    def __init__(self, learning_rate: Any = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 l2: float = 0.0, **kwargs: Any) -> None:
        super().__init__(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov, **kwargs)
        if not l2 >= 0:
            raise ValueError(f"CoupledSGD: l2 = {l2!r}: expected a number >= 0")
        self.l2 = float(l2)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """SGD's step on ``gradient + l2 * variable``."""
        if self.l2:
            from keras import ops

            gradient = ops.add(ops.cast(gradient, variable.dtype),
                               ops.multiply(ops.cast(self.l2, variable.dtype), variable))
        super().update_step(gradient, variable, learning_rate)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "l2": self.l2}


def learning_rate(opt: Any, batch_size: int, steps_per_epoch: int, epochs: int) -> Any:
    """The schedule of ``opt`` (an ``OptimizerConfig``), its base rate scaled linearly from
    batch 128 to ``batch_size``."""
    rate = opt.learning_rate * batch_size / 128
    if opt.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(rate, decay_steps=max(steps_per_epoch * epochs, 1))
    if opt.schedule == "step":
        milestones = [m for m in opt.milestones if m < epochs]
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            [m * steps_per_epoch for m in milestones],
            [rate * opt.decay_rate ** i for i in range(len(milestones) + 1)]) if milestones else rate
    return rate


def sgd(opt: Any, rate: Any) -> Any:
    """The SGD of ``opt`` (an ``OptimizerConfig``: momentum, Nesterov, weight decay and its
    rule) at learning rate ``rate`` (a number or a schedule)."""
    if opt.weight_decay_mode not in WEIGHT_DECAY_MODES:
        raise ValueError(f"weight_decay_mode {opt.weight_decay_mode!r}: expected one of {WEIGHT_DECAY_MODES}")
    if opt.weight_decay_mode == "coupled":
        return CoupledSGD(rate, momentum=opt.momentum, nesterov=opt.nesterov, l2=opt.weight_decay)
    return keras.optimizers.SGD(rate, momentum=opt.momentum, nesterov=opt.nesterov,
                                weight_decay=opt.weight_decay or None)


def stage_sgd(opt: Any, batch_size: int, steps_per_epoch: int, epochs: int) -> Any:
    """A stage's optimizer: ``opt``'s SGD on its schedule."""
    return sgd(opt, learning_rate(opt, batch_size, steps_per_epoch, epochs))


def backbone_sgd(section: Any, batch_size: int, steps_per_epoch: int) -> Any:
    """The optimizer of a pretrained body (``teacher``/``student`` section): the section's SGD
    at ``backbone_lr_scale`` times its rate, and still (rate 0: an exact no-op for either rule)
    for its first ``freeze_epochs``."""
    from tfkd.callbacks import ScaledSchedule

    opt = section.optimizer
    rate = ScaledSchedule(learning_rate(opt, batch_size, steps_per_epoch, section.epochs),
                          section.backbone_lr_scale, section.freeze_epochs * steps_per_epoch)
    return sgd(opt, rate)
