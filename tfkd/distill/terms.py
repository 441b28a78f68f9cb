"""Loss terms: the parts every distillation method is made of.

A term is a small object that declares what it reads (``teacher``: which of the method's teachers;
``needs_index``: per-example dataset indices for a memory bank; ``needs_strong_view``: the models
on a strongly augmented second view), builds what it trains from the models'
shapes (``build``: adapters, discriminators, embeddings, each a Keras layer the Distiller tracks),
computes its unscaled value (``compute``), and may take an optimizer step of its own before the
student's (``auxiliary_step``: the adversarial term's discriminator step). Its ``slot`` says what
it is for, so methods compose: ``cft+dkd`` puts DKD's term in the slot of cft's KD term.

This module imports no TensorFlow at import time: a method's options are checked before
TensorFlow loads; the computations import Keras when they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


# ----------------------------------------------------------------------------- what a term sees
@dataclass
class BuildContext:
    """What a term builds from: the models (by teacher role), their stage shapes, the run."""

    student: Any
    teachers: dict[str, Any]
    sync_bn: bool = False
    steps_per_epoch: int = 1
    #: the training split's labels (a memory bank has an entry per image), or a function that
    #: returns them (a streamed dataset reads them only for a term that asks: ``labels()``)
    train_labels: Any = None
    built: dict[str, "Term"] = field(default_factory=dict)  # terms built so far, by name

    def labels(self) -> Any:
        """The training split's labels (None when the run gave none)."""
        return self.train_labels() if callable(self.train_labels) else self.train_labels

    def shapes(self, model: Any, key: str = "features") -> list[tuple[int, ...]]:
        """(H, W, C) of each of a model's stage outputs (``features``, or ``preact``)."""
        outputs = model.output
        if key not in outputs:
            from tfkd.errors import ModelError

            raise ModelError(f"{model.name} has no {key!r} outputs (pre-activation features come with "
                             "the zoo models; a model saved before tfkd exposed them lacks them)")
        return [tuple(int(d) for d in f.shape[1:]) for f in outputs[key]]

    def teacher(self, role: str) -> Any:
        """The teacher model with ``role``."""
        return self.teachers[role]


@dataclass
class StepInputs:
    """One batch as the terms see it: labels, the student's and each teacher's outputs, the
    examples' dataset indices (or None), a cache terms share (adapted feature maps), and, when a
    term reads the strong view (``needs_strong_view``), the student's and the teachers' outputs
    on it (their own forward passes: batch norm normalizes each view by its own statistics)."""

    labels: Any
    student: dict[str, Any]
    teachers: dict[str, dict[str, Any]]
    index: Any = None
    training: bool = True
    step: Any = None  # the student optimizer's iteration count (a tensor)
    cache: dict[Any, Any] = field(default_factory=dict)
    student_strong: dict[str, Any] | None = None
    teachers_strong: dict[str, dict[str, Any]] | None = None

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per batch for ``key`` (e.g. adapted maps the feature and adversarial
        terms share)."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


# ----------------------------------------------------------------------------- the base class
class Term:
    """A weighted loss term. Subclasses set ``name`` and ``slot`` and implement ``compute``."""

    name = "term"
    slot = "term"
    needs_index = False
    #: True: the term reads the models' outputs on a strongly augmented second view of the batch
    #: (``StepInputs.student_strong``/``teachers_strong``; the data's ``"strong"`` input).
    needs_strong_view = False
    #: True: the term's teacher runs with its batch norm normalizing by each batch's statistics
    #: (its authors' teacher in training mode; its weights still never change), not by its
    #: moving averages.
    teacher_batch_statistics = False

    def __init__(self, weight: float = 1.0, teacher: str = "teacher") -> None:
        self.weight = float(weight)
        self.teacher = teacher
        self.layers: list[Any] = []  # trained with the student
        self.auxiliary_layers: list[Any] = []  # trained by the term's own optimizer

    def build(self, ctx: BuildContext) -> None:
        """Creates the term's trainable parts (``self.layers``) from the models' shapes."""

    def prepare(self, batch: StepInputs) -> None:
        """Computes, while the student's gradient tape records, what ``auxiliary_step`` reads
        (the adapted maps the discriminator step sees are the ones the student term uses)."""

    def compute(self, batch: StepInputs) -> Any:
        """The term's unscaled value: a mean over the local batch."""
        raise NotImplementedError

    def weight_at(self, step: Any) -> Any:
        """The weight at optimizer step ``step`` (constant unless a term warms up)."""
        return self.weight

    # auxiliary optimizer step (the adversarial term's discriminator)
    auxiliary_logs: tuple[str, ...] = ()

    def auxiliary_variables(self) -> list[Any]:
        """Variables an optimizer of the term's own trains (none by default)."""
        return []

    def auxiliary_optimizer(self) -> Any:
        """That optimizer (built by the Distiller in the strategy scope), or None."""
        return None

    def auxiliary_step(self, batch: StepInputs) -> dict[str, Any]:
        """An optimizer step of the term's own before the student's (none by default)."""
        return {}

    def config(self) -> dict[str, Any]:
        """What the term was made with (logged in metrics.json)."""
        return {"weight": self.weight, "teacher": self.teacher}


def linear_warmup(weight: float, epochs: float, steps_per_epoch: int, step: Any) -> Any:
    """``weight * min(e / epochs, 1)`` at the 0-based training ``step``.

    ``e`` is the 1-based epoch, so the weight rises once per epoch, as mdistiller's DKD and
    ReviewKD warm up. A warm-up shorter than one epoch (``0 < epochs < 1``) rises every step
    instead, ``e = (step + 1) / steps_per_epoch``: once per epoch would be the full weight from
    the first step. ``epochs`` 0: the full weight from the start.
    """
    if epochs <= 0:
        return weight
    from keras import ops

    steps = float(max(steps_per_epoch, 1))
    step = ops.cast(step, "float32")
    epoch = (step + 1.0) / steps if epochs < 1 else ops.floor(step / steps) + 1.0
    return weight * ops.minimum(epoch / float(epochs), 1.0)


def global_batch(x: Any) -> Any:
    """``x`` of the whole global batch: every replica's rows, in replica order (under
    MirroredStrategy; ``x`` itself on one device). Gradients flow back to each replica's own
    rows, so a term over the batch (DIST's intra-class relation) equals the one-device term."""
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return x
    return ctx.all_gather(x, axis=0)


# ----------------------------------------------------------------------------- stage pairing
def resolve_stages(stages: str, student: Any, teacher: Any, key: str = "distill.stages") -> list[tuple[int, int]]:
    """Pairs (student stage, teacher stage) to distill: ``last``, ``all`` (aligned from the
    deepest stage up) or a comma list of stage numbers counted from 1 (``"2,3"``); errors name
    the option ``key``."""
    from tfkd.errors import ModelError

    s_count, t_count = len(student.output["features"]), len(teacher.output["features"])
    depth = min(s_count, t_count)
    if stages == "last":
        picked = [depth]
    elif stages == "all":
        picked = list(range(1, depth + 1))
    else:
        try:
            picked = sorted({int(p) for p in stages.split(",")})
        except ValueError:
            raise ModelError(f"{key} = {stages!r}: expected last, all or stage numbers "
                             "like 2,3") from None
        if not picked or picked[0] < 1 or picked[-1] > depth:
            raise ModelError(f"{key} = {stages!r}: stages run from 1 to {depth} for "
                             f"{student.name} ({s_count} stages) and {teacher.name} ({t_count})")
    # stage k of the shallower model pairs with the stage as deep from the end in the other
    return [(s_count - depth + k - 1, t_count - depth + k - 1) for k in picked]


# ----------------------------------------------------------------------------- common terms
class CrossEntropy(Term):
    """Softmax cross-entropy of the student's logits with the labels."""

    name = slot = "ce"

    def compute(self, batch: StepInputs) -> Any:
        from tfkd import losses

        return losses.cross_entropy(batch.labels, batch.student["logits"])


class LogitTerm(Term):
    """A term on the teacher's and the student's logits. ``standardize`` (logit standardization,
    Sun et al. 2024) z-scores both per example before the temperature-softmax."""

    slot = "logit"

    def __init__(self, weight: float = 1.0, teacher: str = "teacher", temperature: float = 4.0,
                 standardize: bool = False) -> None:
        super().__init__(weight, teacher)
        self.temperature = float(temperature)
        self.standardize = bool(standardize)

    def logits(self, batch: StepInputs) -> tuple[Any, Any]:
        """(teacher, student) logits, standardized when asked."""
        from tfkd import losses

        t, s = batch.teachers[self.teacher]["logits"], batch.student["logits"]
        if self.standardize:
            t, s = losses.standardize(t), losses.standardize(s)
        return t, s

    def apply_standardization(self, temperature: float, weight: float) -> None:
        """Logit standardization's setting of this term: standardized logits at the authors'
        base temperature (a term the authors set a weight for also takes ``weight``)."""
        self.standardize, self.temperature = True, float(temperature)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "temperature": self.temperature, "standardize": self.standardize}


class KD(LogitTerm):
    """Hinton KD: ``tau^2 KL(softmax(t / tau) || softmax(s / tau))``."""

    name = "kd"

    def compute(self, batch: StepInputs) -> Any:
        from tfkd import losses

        t, s = self.logits(batch)
        return losses.kd(t, s, self.temperature)

    def apply_standardization(self, temperature: float, weight: float) -> None:
        """The authors' KD + logit standardization sets the KD weight to ``weight`` (9)."""
        self.standardize, self.temperature, self.weight = True, float(temperature), float(weight)


class AdaptedFeatures:
    """ConvBlock adapters from student stages onto a teacher's stages, shared by the terms that
    read the same teacher at the same stages (cft's feature and adversarial terms)."""

    def __init__(self, ctx: BuildContext, teacher: str, stages: str, relu: bool, prefix: str,
                 key: str = "distill.stages") -> None:
        from tfkd.distill.adapters import ConvBlock

        model = ctx.teacher(teacher)
        self.teacher, self.stages, self.relu = teacher, stages, relu
        self.pairs = resolve_stages(stages, ctx.student, model, key)
        t_shapes, s_shapes = ctx.shapes(model), ctx.shapes(ctx.student)
        self.adapters = [ConvBlock(t_shapes[t], ctx.sync_bn, relu, name=f"{prefix}_s{s + 1}")
                         for s, t in self.pairs]
        for adapter, (s, _) in zip(self.adapters, self.pairs):
            adapter.build((None, *s_shapes[s]))

    def adapted(self, batch: StepInputs) -> list[Any]:
        """The adapted student maps of this batch (computed once, shared)."""
        feats = batch.student["features"]
        return batch.cached(("adapted", id(self)), lambda: [
            a(feats[s], training=batch.training) for a, (s, _) in zip(self.adapters, self.pairs)])

    def targets(self, batch: StepInputs) -> list[Any]:
        """The teacher maps they are compared with."""
        feats = batch.teachers[self.teacher]["features"]
        return [feats[t] for _, t in self.pairs]


def shared_adapters(ctx: BuildContext, teacher: str, stages: str, relu: bool, prefix: str,
                    key: str = "distill.stages") -> AdaptedFeatures:
    """The ``AdaptedFeatures`` of a term built before with the same teacher, stages and ReLU
    option, else new ones."""
    for term in ctx.built.values():
        found = getattr(term, "adapted", None)
        if isinstance(found, AdaptedFeatures) and (found.teacher, found.stages, found.relu) == (teacher, stages, relu):
            return found
    return AdaptedFeatures(ctx, teacher, stages, relu, prefix, key)


class Feature(Term):
    """Pixel-level feature loss ``mean((C(F_s) - F_t)^2)`` through ConvBlock adapters, averaged
    over the stage pairs (CFT's feature term)."""

    name = slot = "feat"

    def __init__(self, weight: float = 1.0, teacher: str = "teacher", stages: str = "last",
                 adapter_relu: bool = False, stages_key: str = "distill.stages") -> None:
        super().__init__(weight, teacher)
        self.stages, self.adapter_relu, self.stages_key = stages, bool(adapter_relu), stages_key

    def build(self, ctx: BuildContext) -> None:
        self.adapted = shared_adapters(ctx, self.teacher, self.stages, self.adapter_relu, "feat_adapter",
                                       self.stages_key)
        self.layers = list(self.adapted.adapters)

    def compute(self, batch: StepInputs) -> Any:
        from keras import ops

        from tfkd import losses

        values = [losses.feature(a, t) for a, t in zip(self.adapted.adapted(batch), self.adapted.targets(batch))]
        return ops.sum(ops.stack(values)) / len(values)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "stages": self.stages, "adapter_relu": self.adapter_relu}


class Adversarial(Term):
    """Spatial-level adversarial loss: feature-map discriminators learn to tell teacher maps
    (real) from adapted student maps (fake) in an optimizer step of their own before the
    student's, and the student learns to fool the just-updated ones. Reuses the feature term's
    adapters when it reads the same teacher (CFT), else owns its own (MKTN's Teacher1).

    The discriminator step feeds real and fake maps as one batch in training mode, so its batch
    norm normalizes both with the same statistics; the student's term queries the discriminators
    in inference mode. ``warmup_steps``: the student ignores the term for its first N steps (the
    discriminators train from the first).
    """

    name = slot = "adv"
    auxiliary_logs = ("d_loss", "d_real_acc", "d_fake_acc")

    def __init__(self, weight: float = 0.1, teacher: str = "teacher", stages: str = "last",
                 adapter_relu: bool = False, gan_loss: str = "lsgan", warmup_steps: int = 0,
                 width: float = 1.0, learning_rate: float = 2e-5, beta_1: float = 0.5,
                 stages_key: str = "distill.stages") -> None:
        super().__init__(weight, teacher)
        self.stages_key = stages_key
        self.stages, self.adapter_relu, self.gan_loss = stages, bool(adapter_relu), gan_loss
        self.warmup_steps, self.width = int(warmup_steps), float(width)
        self.learning_rate, self.beta_1 = float(learning_rate), float(beta_1)
        self.optimizer: Any = None

    def build(self, ctx: BuildContext) -> None:
        import keras

        from tfkd.distill.discriminator import build_discriminator

        self.adapted = shared_adapters(ctx, self.teacher, self.stages, self.adapter_relu, "adv_adapter",
                                       self.stages_key)
        owns = not any(getattr(t, "adapted", None) is self.adapted for t in ctx.built.values())
        t_shapes = ctx.shapes(ctx.teacher(self.teacher))
        self.discriminators = [build_discriminator(t_shapes[t], ctx.sync_bn, f"discriminator_s{s + 1}", self.width)
                               for s, t in self.adapted.pairs]
        self.layers = list(self.adapted.adapters) if owns else []
        self.auxiliary_layers = list(self.discriminators)
        self.optimizer = keras.optimizers.Adam(self.learning_rate, beta_1=self.beta_1)

    def auxiliary_variables(self) -> list[Any]:
        return [v for d in self.discriminators for v in d.trainable_variables]

    def auxiliary_optimizer(self) -> Any:
        return self.optimizer

    def discriminate(self, real: Sequence[Any], fake: Sequence[Any]) -> dict[str, Any]:
        """One update of the discriminators on teacher (real) vs adapted student (fake) maps."""
        import tensorflow as tf

        from tfkd import losses

        with tf.GradientTape() as tape:
            d_losses, real_acc, fake_acc = [], [], []
            for disc, r, f in zip(self.discriminators, real, fake):
                logits = disc(tf.concat([r, tf.stop_gradient(f)], axis=0), training=True)
                real_logits, fake_logits = tf.split(logits, 2, axis=0)
                d_losses.append(losses.discriminator_loss(real_logits, fake_logits, self.gan_loss))
                real_acc.append(tf.reduce_mean(losses.judged_real(real_logits, self.gan_loss)))
                fake_acc.append(1.0 - tf.reduce_mean(losses.judged_real(fake_logits, self.gan_loss)))
            d_loss = tf.add_n(d_losses) / len(d_losses)
            scaled = losses.scale_for_replicas(d_loss)
        variables = self.auxiliary_variables()
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        return {"d_loss": d_loss, "d_real_acc": tf.add_n(real_acc) / len(real_acc),
                "d_fake_acc": tf.add_n(fake_acc) / len(fake_acc)}

    def prepare(self, batch: StepInputs) -> None:
        self.adapted.adapted(batch)

    def auxiliary_step(self, batch: StepInputs) -> dict[str, Any]:
        return self.discriminate(self.adapted.targets(batch), self.adapted.adapted(batch))

    def compute(self, batch: StepInputs) -> Any:
        from keras import ops

        from tfkd import losses

        values = [losses.adversarial(d(a, training=False), self.gan_loss)
                  for d, a in zip(self.discriminators, self.adapted.adapted(batch))]
        return ops.sum(ops.stack(values)) / len(values)

    def weight_at(self, step: Any) -> Any:
        if self.warmup_steps <= 0:
            return self.weight
        from keras import ops

        return self.weight * ops.cast(ops.greater_equal(step, self.warmup_steps), "float32")

    def config(self) -> dict[str, Any]:
        return {**super().config(), "stages": self.stages, "gan_loss": self.gan_loss,
                "warmup_steps": self.warmup_steps, "width": self.width,
                "learning_rate": self.learning_rate, "beta_1": self.beta_1}
