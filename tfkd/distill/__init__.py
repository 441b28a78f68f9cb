"""Knowledge transfer: the Distiller (one ``train_step`` for every method), the loss terms
(``terms``), the registered methods (``methods``), the ConvBlock adapter and the feature-map
discriminator.

The methods and terms are plain Python at import time, so options are validated without Keras;
the Keras parts are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from tfkd.distill.methods import METHODS, REGISTRY, resolve, teachers_needed
from tfkd.distill.terms import resolve_stages

_LAZY = {"ConvBlock": "adapters", "build_discriminator": "discriminator", "Distiller": "distiller",
         "from_config": "distiller"}

__all__ = ["ConvBlock", "Distiller", "METHODS", "REGISTRY", "build_discriminator", "from_config",
           "resolve", "resolve_stages", "teachers_needed"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"tfkd.distill.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tfkd.distill' has no attribute {name!r}")
