"""Named training recipes (``--recipe NAME``, config key ``recipe``): the settings a method's
authors trained a table's teacher-student pairs with, so that a run reproduces their schedule.

A recipe is a layer of config values under everything the user gives (a config file, ``--set``
and the dedicated flags win over it): settings for every run, settings by student model, and
settings by (teacher model, student model) pair. Reads no TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tfkd.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    """A named preset: ``common`` for every run, ``by_student`` by ``student.model``, ``by_pair``
    by ``(teacher.model, student.model)``; values are dotted config keys."""

    description: str
    source: str
    common: dict[str, Any]
    by_student: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_pair: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def settings(self, teacher_model: str, student_model: str) -> dict[str, Any]:
        """The dotted config values this recipe gives a run of ``teacher_model`` -> ``student_model``."""
        return {**self.common, **self.by_student.get(student_model, {}),
                **self.by_pair.get((teacher_model, student_model), {})}


def _sgd(rate_at_128: float) -> dict[str, Any]:
    """Both stages' SGD: momentum 0.9 (no Nesterov), coupled decay 5e-4, x0.1 at 150/180/210."""
    return {f"{section}.optimizer.{key}": value for section in ("teacher", "student") for key, value in {
        "learning_rate": rate_at_128, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4,
        "weight_decay_mode": "coupled", "schedule": "step", "milestones": [150, 180, 210],
        "decay_rate": 0.1}.items()}


def _pairs() -> dict[tuple[str, str], dict[str, Any]]:
    """mdistiller's per-pair settings: DKD's beta (SDD-DKD's, ``distill.sdd.beta``, the same in
    SDD's configs/cifar100/sdd_dkd files), and SDD's scales M (its authors' teacher_resnet32x4.sh and
    teacher_vgg.sh: [1,2] for these two pairs, the default [1,2,4] for every other pair they ran)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for beta, pairs in ((2.0, (("resnet56", "resnet20"), ("resnet110", "resnet32"),  # and the imported
                               ("resnet56a", "resnet20"), ("resnet110a", "resnet32"))),  # option-A teachers
                        (6.0, (("vgg13", "vgg8"), ("vgg13", "mobilenetv2"), ("wrn_40_2", "wrn_16_2"),
                               ("wrn_40_2", "wrn_40_1")))):
        for pair in pairs:
            found[pair] = {"distill.dkd.beta": beta, "distill.sdd.beta": beta}
    for pair in (("resnet32x4", "resnet8x4"), ("vgg13", "vgg8")):
        found.setdefault(pair, {})["distill.sdd.scales"] = [1, 2]
    return found


_MDISTILLER_PAIRS = _pairs()


#: mdistiller's (and RepDistiller's) CIFAR-100 training: batch 64, lr 0.05 (0.01 for MobileNetV2
#: and ShuffleNet students), 240 epochs; DKD's beta per pair from its configs/cifar100/dkd files.
#: tfkd scales learning rates linearly from batch 128, so 0.05 at batch 64 is written 0.1.
MDISTILLER_CIFAR100 = Recipe(
    description="mdistiller's CIFAR-100 training: batch 64, SGD momentum 0.9 without Nesterov, lr "
                "0.05 (0.01 for MobileNetV2 students), coupled weight decay 5e-4, lr x0.1 at epochs "
                "150, 180 and 210, 240 epochs, the test split evaluated every epoch (best and last "
                "reported); DKD's beta per pair (2 for resnet56/resnet110 teachers, 6 for the VGG and "
                "WRN pairs, 8 otherwise; SDD-DKD's too); SDD's scales [1,2] for resnet32x4->resnet8x4 "
                "and vgg13->vgg8 (its authors' scripts)",
    source="megvii-research/mdistiller configs/cifar100 (and its engine/trainer.py)",
    common={"data.batch_size": 64, "teacher.epochs": 240, "student.epochs": 240,
            "data.test_every_epoch": True, **_sgd(0.1)},
    by_student={name: {"student.optimizer.learning_rate": 0.02} for name in ("mobilenetv2", "mobilenetv2_x0_5")},
    by_pair=_MDISTILLER_PAIRS,
)

RECIPES: dict[str, Recipe] = {"mdistiller-cifar100": MDISTILLER_CIFAR100}


def get(name: str) -> Recipe:
    """The recipe ``name``; ``ConfigError`` naming the known ones otherwise."""
    if name not in RECIPES:
        raise ConfigError(f"option 'recipe' = {name!r}: expected one of {', '.join(sorted(RECIPES))} "
                          "(or empty: no recipe)")
    return RECIPES[name]
