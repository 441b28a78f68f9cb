"""Complementary feature transfer, shared by the two methods of the seed papers (CFT, 2020, with
one reconstruction-augmented teacher, and MKTN, 2024, with two): their options and their terms,
``c CE + gamma KD + alpha feature + beta adversarial`` (METHOD.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tfkd.options import non_negative, option, positive, section


@dataclass
class DiscriminatorOptions:
    """The feature-map discriminators: capacity and Adam optimizer (``*.discriminator.*``)."""

    learning_rate: float = option(2e-5, "discriminator Adam learning rate (2e-4 saturated the "
                                         "discriminator on CIFAR-10: benchmarks/README.md)", **positive())
    beta_1: float = option(0.5, "discriminator Adam beta_1", lambda v: 0 <= v < 1, "in [0, 1)")
    width: float = option(1.0, "capacity: multiplies the hidden convolutions' channels (C/2, C/4 "
                               "of a C-channel map)", **positive())


@dataclass
class Options:
    """The options of complementary feature transfer."""

    alpha: float = option(1.0, "feature-loss weight", **non_negative())
    beta: float = option(0.1, "adversarial-loss weight", **non_negative())
    gamma: float = option(0.9, "KD-on-logits weight (METHOD.md's default is 0; 0.9 won the "
                               "validation tuning, see benchmarks/README.md)", **non_negative())
    ce_weight: float = option(1.0, "cross-entropy weight (0.1 with gamma 0.9: kd's loss plus the "
                                   "feature and adversarial terms)", **non_negative())
    temperature: float = option(4.0, "temperature of the KD term", **positive())
    stages: str = option("last", "stages for the feature and adversarial terms: last, all, or stage "
                                 "numbers from 1 like 2,3")
    gan_loss: str = option("lsgan", "adversarial loss: lsgan or bce (non-saturating)",
                           lambda v: v in ("lsgan", "bce"), "lsgan or bce")
    adv_warmup_epochs: int = option(0, "epochs before the student's adversarial term switches on "
                                       "(the discriminator trains throughout)", **non_negative())
    adapter_relu: bool = option(False, "end every ConvBlock adapter with a ReLU (teacher stage "
                                       "outputs are post-ReLU, so non-negative)")
    discriminator: DiscriminatorOptions = section(DiscriminatorOptions, "discriminator capacity and optimizer")


def complementary_terms(options: Options, run: Any, feature_teacher: str, adversarial_teacher: str,
                        namespace: str) -> list[Any]:
    """The terms with a non-zero weight: CE, KD and the feature term read ``feature_teacher``,
    the adversarial term ``adversarial_teacher`` (the same one in CFT, where both share one
    adapter per stage); errors name the options of ``distill.<namespace>``."""
    from tfkd.distill.terms import KD, Adversarial, CrossEntropy, Feature

    found: list[Any] = []
    if options.ce_weight:
        found.append(CrossEntropy(options.ce_weight))
    if options.gamma:
        found.append(KD(options.gamma, feature_teacher, temperature=options.temperature))
    if options.alpha:
        found.append(Feature(options.alpha, feature_teacher, options.stages, options.adapter_relu,
                             f"distill.{namespace}.stages"))
    if options.beta:
        disc = options.discriminator
        found.append(Adversarial(options.beta, adversarial_teacher, options.stages, options.adapter_relu,
                                 options.gan_loss, options.adv_warmup_epochs * run.steps_per_epoch,
                                 disc.width, disc.learning_rate, disc.beta_1, f"distill.{namespace}.stages"))
    return found
