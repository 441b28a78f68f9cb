"""``student``: the student trained alone, cross-entropy only (the reference every gain is from)."""

from __future__ import annotations

from typing import Any

NAME = "student"
SUMMARY = "CE (the student trained alone)"
TEACHERS: tuple[str, ...] = ()


def terms(options: Any, run: Any) -> list[Any]:
    """Cross-entropy alone."""
    from tfkd.distill.terms import CrossEntropy

    return [CrossEntropy(1.0)]
