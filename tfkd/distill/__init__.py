"""Knowledge transfer: the Distiller (one ``train_step`` for every method), the ConvBlock
adapter, the feature-map discriminator and the method table.

The method table (``tfkd.distill.methods``) is plain Python, so options can be validated
without Keras; the Keras parts are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from tfkd.distill.methods import METHODS, LossWeights, loss_weights, teachers_needed

_LAZY = {"ConvBlock": "adapters", "build_discriminator": "discriminator", "Distiller": "distiller",
         "resolve_stages": "distiller"}

__all__ = ["ConvBlock", "Distiller", "LossWeights", "METHODS", "build_discriminator",
           "loss_weights", "resolve_stages", "teachers_needed"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"tfkd.distill.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tfkd.distill' has no attribute {name!r}")
