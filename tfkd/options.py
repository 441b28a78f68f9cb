"""How a typed config option is declared: a dataclass field with its help text and its check.

Shared by ``tfkd.config`` (the run's sections) and the methods' option classes
(``tfkd.distill.methods``), so every option, wherever it is declared, shows in ``--help`` with
its default and is validated the same way, naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Callable, Iterator


def option(default: Any, help: str, valid: Callable[[Any], bool] | None = None,
           expected: str = "") -> Any:
    """A dataclass field with a help text (shown by ``--help``) and, optionally, a check
    (``valid(value)``) whose failure says ``expected``."""
    metadata = {"help": help, "valid": valid, "expected": expected}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, help: str) -> Any:
    """A nested config section."""
    return field(default_factory=cls, metadata={"help": help})


def checks(node: Any, prefix: str) -> Iterator[tuple[str, Any, bool, str]]:
    """(dotted key, value, passes, expected) for every option of ``node`` that declares a check."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from checks(value, f"{prefix}{f.name}.")
        elif f.metadata.get("valid") is not None:
            yield f"{prefix}{f.name}", value, bool(f.metadata["valid"](value)), f.metadata["expected"]


def non_negative() -> dict[str, Any]:
    """The check of a loss weight (and of other quantities that cannot be negative)."""
    return {"valid": lambda v: v >= 0, "expected": ">= 0"}


def positive() -> dict[str, Any]:
    """The check of a temperature, a rate, a width."""
    return {"valid": lambda v: v > 0, "expected": "> 0"}
