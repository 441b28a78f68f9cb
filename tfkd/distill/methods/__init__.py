"""Distillation methods as registered specs: ``REGISTRY`` maps each name to its ``Method``.

A method is one small module in this package: its options (a dataclass, read as
``distill.<name>.*``), the teachers it takes (by role, in command-line order), the loss terms it
builds from its options (``tfkd.distill.terms``), and for a modifier (``ls``) how it changes the
terms of the methods before it. Adding a method is one new module and one line in ``MODULES``.

Methods compose with ``+``: ``cft+dkd`` is cft's terms with DKD's term in the slot of cft's KD
term (it reads the teacher the replaced term read), a term of a slot the first method lacks is
added (reading the method's last teacher), and ``kd+ls`` standardizes the logits of kd's logit
term. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from tfkd.errors import ConfigError

#: The registry: one line per method module of this package, in the order help texts list them.
MODULES = (
    "student",
    "kd",
    "fitnet",
    "at",
    "cft",
    "mktn",
    "dkd",
    "dist",
    "ls",
    "ofd",
    "reviewkd",
    "crd",
    "nkd",
    "wttm",
    "ctkd",
    "sdd",
    "mlkd",
)


@dataclass(frozen=True)
class RunInfo:
    """What a method's terms may depend on besides its options."""

    steps_per_epoch: int = 1


@dataclass(frozen=True)
class Method:
    """A registered method.

    ``terms(options, run)`` returns its loss terms; ``teachers`` are the roles of the teachers it
    takes, in command-line order (``teacher``, ``reconstruction``: trained with the config's loss
    weights; ``autoencoder``, ``classifier``: MKTN's two); ``modify(terms, options)`` is a
    modifier's change to the terms of the methods before it.
    """

    name: str
    summary: str
    options: type | None = None
    teachers: tuple[str, ...] = ("teacher",)
    terms: Callable[[Any, RunInfo], list[Any]] | None = None
    modify: Callable[[list[Any], Any], None] | None = None


def spec(module: Any) -> Method:
    """A method module's ``Method`` (its NAME, SUMMARY, Options, TEACHERS, terms, modify)."""
    return Method(module.NAME, module.SUMMARY, getattr(module, "Options", None),
                  tuple(getattr(module, "TEACHERS", ("teacher",))), getattr(module, "terms", None),
                  getattr(module, "modify", None))


REGISTRY: dict[str, Method] = {m.NAME: spec(m) for m in (
    importlib.import_module(f"{__name__}.{module}") for module in MODULES)}
METHODS = tuple(REGISTRY)
#: Training recipe of each teacher role for ``--stage all``: (lambda_cls, lambda_rec); None: the
#: config's ``teacher.lambda_cls``/``lambda_rec``.
ROLE_RECIPES: dict[str, tuple[float, float] | None] = {
    "teacher": None, "reconstruction": None, "autoencoder": (0.0, 1.0), "classifier": (1.0, 0.0)}


@dataclass(frozen=True)
class Composite:
    """A method string resolved: ``kd``, ``cft+dkd``, ``dkd+ls``."""

    name: str
    parts: tuple[Method, ...]

    @property
    def teachers(self) -> tuple[str, ...]:
        """The teacher roles, in command-line order: the first method's."""
        return self.parts[0].teachers

    @property
    def namespaces(self) -> tuple[str, ...]:
        """The option sections this method reads: ``distill.<name>`` of each part."""
        return tuple(p.name for p in self.parts if p.options is not None)

    def terms(self, distill: Any, run: RunInfo) -> list[Any]:
        """The composed loss terms with the options of ``distill`` (the config section)."""
        first, *rest = self.parts
        terms = list(first.terms(getattr(distill, first.name, None), run)) if first.terms else []
        for part in rest:
            options = getattr(distill, part.name, None)
            if part.modify is not None:
                part.modify(terms, options)
                continue
            for term in part.terms(options, run) if part.terms else []:
                slots = [i for i, t in enumerate(terms) if t.slot == term.slot]
                if slots:
                    term.teacher = terms[slots[0]].teacher
                    terms[slots[0]] = term
                else:
                    if term.teacher not in self.teachers:
                        term.teacher = self.teachers[-1]
                    terms.append(term)
        return terms


def resolve(name: str) -> Composite:
    """The method ``name`` (``a+b+...``). Raises ``ConfigError`` naming an unknown part, a
    modifier first, or a part given twice."""
    parts = [p.strip() for p in str(name).split("+")]
    unknown = [p for p in parts if p not in REGISTRY]
    if unknown or not parts:
        raise ConfigError(f"option 'distill.method' = {name!r}: expected one of {', '.join(METHODS)} "
                          "or a composition like cft+dkd, kd+ls")
    if len(set(parts)) != len(parts):
        raise ConfigError(f"option 'distill.method' = {name!r}: a method appears twice")
    methods = tuple(REGISTRY[p] for p in parts)
    if methods[0].modify is not None:
        raise ConfigError(f"option 'distill.method' = {name!r}: {parts[0]} modifies another method's "
                          f"terms; put it after one (e.g. kd+{parts[0]})")
    if any(m.teachers and not methods[0].teachers for m in methods[1:]):
        raise ConfigError(f"option 'distill.method' = {name!r}: {parts[0]} takes no teacher, so "
                          "nothing can be added to it")
    return Composite(name, methods)


def teachers_needed(method: str) -> int:
    """How many teachers ``method`` takes: 0 (student alone), 1, or 2 (mktn)."""
    return len(resolve(method).teachers)


def reads_option(method: str, option: str) -> bool:
    """Whether ``method`` reads ``distill.<option>`` (dotted sub-keys allowed): its own
    sections, ``method``, ``teachers`` and how the teachers and the student are read (their
    taps, scores and input convention: they change what every method distills)."""
    top = option.split(".", 1)[0]
    return top in ("method", "teachers", *MODEL_READING) or top in resolve(method).namespaces


#: ``distill.*`` options about reading the models, shared by every method.
MODEL_READING = ("teacher_layers", "student_layers", "teacher_output", "teacher_input")


#: Flat ``distill.*`` keys of tfkd before methods had namespaces -> (default owner, new key).
LEGACY_KEYS = {
    "alpha": ("cft", "alpha"), "beta": ("cft", "beta"), "gamma": ("cft", "gamma"),
    "ce_weight": ("cft", "ce_weight"), "stages": ("cft", "stages"), "gan_loss": ("cft", "gan_loss"),
    "adv_warmup_epochs": ("cft", "adv_warmup_epochs"), "adapter_relu": ("cft", "adapter_relu"),
    "discriminator": ("cft", "discriminator"), "temperature": ("kd", "temperature"),
    "kd_alpha": ("kd", "alpha"), "hint_weight": ("fitnet", "weight"), "at_weight": ("at", "weight")}


def legacy_key(key: str, method: str) -> str | None:
    """The namespaced key an old flat ``distill.*`` key means with ``method`` (its first part's
    section when that has the option, else the old owner's), or None if ``key`` is not an old one."""
    parts = key.split(".")
    if len(parts) < 2 or parts[0] != "distill" or parts[1] not in LEGACY_KEYS:
        return None
    owner, new = LEGACY_KEYS[parts[1]]
    first = str(method).split("+")[0].strip()
    options = REGISTRY[first].options if first in REGISTRY else None
    import dataclasses

    # an option of the same name moves to the chosen method's section (mktn's beta); a renamed
    # one (kd_alpha: kd's alpha) always goes to its owner's
    if new == parts[1] and options is not None and new in {f.name for f in dataclasses.fields(options)}:
        owner = first
    return ".".join(["distill", owner, new, *parts[2:]])
