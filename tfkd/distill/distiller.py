"""The Distiller: one Keras model and one ``train_step`` for every distillation method.

It holds the student, the frozen teachers (by role) and the method's loss terms
(``tfkd.distill.terms``), and tracks the layers each term trains. Per batch:

1. the teachers run in inference mode (a term may ask for its teacher's batch norm to use the
   batch's statistics, as OFD's authors run it; their weights never change), the student once,
   under the student's gradient tape; each term prepares what it shares (adapted maps). When a
   term reads the strong view (the input's ``"strong"``), every model also runs on it, a
   forward pass of its own;
2. every term with an optimizer of its own takes its step (the adversarial term's
   discriminators: teacher maps real, adapted student maps, gradient stopped, fake);
3. the student step: the weighted sum of the terms (weights may warm up with the step count),
   scaled once for the replica count; the student optimizer updates the student and the terms'
   layers only.

Steps 2 and 3 see the same student forward pass, which is what "one discriminator step, then one
student step" computes, without running the student twice. The Distiller never names a term or a
method: ``from_config`` builds one from the run configuration.
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
import tensorflow as tf

from tfkd import losses, precision
from tfkd.distill.terms import BuildContext, StepInputs, Term, resolve_stages
from tfkd.errors import ModelError
from tfkd.models.applications import HEAD_LAYERS

__all__ = ["Distiller", "from_config", "resolve_stages"]


class Distiller(keras.Model):
    """Student + frozen teachers + the terms' layers, trained by one ``train_step``.

    Args:
        student: a model with ``{"logits", "features"}`` outputs (the zoo's, or a wrapped one).
        teachers: teacher role -> model (frozen here); empty for the student alone.
        terms: the method's loss terms (``tfkd.distill.methods.resolve(...).terms(...)``).
        sync_bn: synchronized batch norm in the terms' layers.
        steps_per_epoch, train_labels: what warm-ups and memory banks are sized from (the
            labels, or a function returning them: ``BuildContext.train_labels``).
        head_layers: the student's layers that are new on a pretrained network (its head): with a
            ``backbone_optimizer`` they train at the full rate, with the terms' layers.
    """

    def __init__(self, student: keras.Model, teachers: dict[str, keras.Model] | None = None,
                 terms: Sequence[Term] = (), sync_bn: bool = False, steps_per_epoch: int = 1,
                 train_labels: Any = None, head_layers: Sequence[str] = HEAD_LAYERS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.student = student
        self.head_layers = tuple(head_layers)
        teachers = dict(teachers or {})
        self.terms = list(terms)
        #: Per teacher role, whether it runs in training mode: its batch norm normalizes by the
        #: batch's statistics (a term asks for it); its weights are never trained either way.
        self.teacher_training = {role: any(t.teacher == role and t.teacher_batch_statistics for t in self.terms)
                                 for role in teachers}
        for role, model in teachers.items():
            model.trainable = False
            if self.teacher_training[role]:  # Keras runs a frozen batch norm on its moving averages
                for layer in model._flatten_layers():
                    if isinstance(layer, keras.layers.BatchNormalization):
                        layer.trainable = True
        self.teacher_models = teachers
        missing = sorted({t.teacher for t in self.terms if t.name != "ce"} - set(teachers))
        if missing:
            raise ModelError(f"terms {[t.name for t in self.terms]} need the teacher(s) {missing}")
        ctx = BuildContext(student, teachers, sync_bn, steps_per_epoch, train_labels)
        with precision.policy_scope("float32"):  # the terms' layers compute what the losses read
            for term in self.terms:
                term.build(ctx)
                ctx.built[term.name] = term
        self.term_layers = _unique([layer for term in self.terms for layer in term.layers])
        self.auxiliary_layers = _unique([layer for term in self.terms for layer in term.auxiliary_layers])
        self.auxiliary_terms = [t for t in self.terms if t.auxiliary_variables()]
        self.auxiliary_optimizers = [t.auxiliary_optimizer() for t in self.auxiliary_terms]
        self.needs_index = any(t.needs_index for t in self.terms)
        self.needs_strong_view = any(t.needs_strong_view for t in self.terms)
        self.weights_by_term = {t.name: t.weight for t in self.terms}
        names = ["loss", "ce", *[t.name for t in self.terms if t.name != "ce"],
                 *[n for t in self.auxiliary_terms for n in t.auxiliary_logs]]
        self.trackers = {n: keras.metrics.Mean(name=n) for n in dict.fromkeys(names)}
        self.trackers["accuracy"] = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    # ------------------------------------------------------------------ building blocks
    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        return list(self.trackers.values())

    @property
    def adapters(self) -> list[Any]:
        """Every layer the student step trains besides the student (adapters, connectors,
        fusion modules, embeddings), each once."""
        return list(self.term_layers)

    @property
    def student_variables(self) -> list[tf.Variable]:
        """What the student step trains: the student and the terms' layers, nothing else."""
        variables = list(self.student.trainable_variables)
        for layer in self.term_layers:
            variables += layer.trainable_variables
        return variables

    def variable_groups(self) -> list[tuple[Any, list[tf.Variable]]]:
        """(optimizer, variables) of the student step: everything with ``optimizer``, or the
        student's body with ``backbone_optimizer`` and the rest (its head, the terms' layers)
        with ``optimizer``."""
        variables = self.student_variables
        if getattr(self, "backbone_optimizer", None) is None:
            return [(self.optimizer, variables)]
        head = {id(v) for layer in self.student.layers if layer.name in self.head_layers
                for v in layer.trainable_variables}
        body = [v for v in self.student.trainable_variables if id(v) not in head]
        mine = {id(v) for v in body}
        return [(self.optimizer, [v for v in variables if id(v) not in mine]), (self.backbone_optimizer, body)]

    @property
    def discriminator_variables(self) -> list[tf.Variable]:
        """What the terms' own optimizers train (the discriminators)."""
        return [v for t in self.auxiliary_terms for v in t.auxiliary_variables()]

    @property
    def d_optimizer(self) -> Any:
        """The first auxiliary optimizer (the discriminators'), or None."""
        return self.auxiliary_optimizers[0] if self.auxiliary_optimizers else None

    def teacher(self, role: str | None = None) -> keras.Model | None:
        """The teacher with ``role`` (default: the only or the last one)."""
        if role is None:
            return list(self.teacher_models.values())[-1] if self.teacher_models else None
        return self.teacher_models[role]

    def compile(self, optimizer: Any = "sgd", discriminator_optimizer: Any = None,
                backbone_optimizer: Any = None, **kwargs: Any) -> None:
        """``optimizer`` trains the student and the terms' layers; ``backbone_optimizer``, when
        given, trains the student's body instead (all but its ``head_layers``: a pretrained
        network fine-tuned at its own rate); ``discriminator_optimizer``, when given, replaces
        the optimizer of every term that has one of its own."""
        super().compile(optimizer=optimizer, **kwargs)
        self.backbone_optimizer = keras.optimizers.get(backbone_optimizer) if backbone_optimizer else None
        if self.backbone_optimizer is not None and isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            self.backbone_optimizer = keras.optimizers.LossScaleOptimizer(self.backbone_optimizer)
        if discriminator_optimizer is not None:
            given = keras.optimizers.get(discriminator_optimizer)
            self.auxiliary_optimizers = []
            for i, term in enumerate(self.auxiliary_terms):  # one optimizer each: copies of the first
                term.optimizer = given if i == 0 else given.__class__.from_config(given.get_config())
                self.auxiliary_optimizers.append(term.optimizer)

    def build(self, input_shape: Any = None) -> None:
        """The terms built their layers from the models' shapes already."""
        self.built = True

    def build_all(self) -> None:
        """Creates every variable (terms' layers, every optimizer's slots).

        Call inside the strategy scope before ``fit``: several optimizers under MirroredStrategy
        fail on the first step unless all are built there, and a backup can only be restored
        into built models and optimizers.
        """
        self.build(self.student.input_shape)
        for optimizer, variables in self.variable_groups():
            optimizer.build(variables)
        for term, optimizer in zip(self.auxiliary_terms, self.auxiliary_optimizers):
            optimizer.build(term.auxiliary_variables())

    def call(self, images: tf.Tensor, training: bool = False) -> dict[str, Any]:
        """The student's outputs: what a Distiller predicts is what the student predicts."""
        if isinstance(images, dict):
            images = images["images"]
        return self.student(images, training=training)

    def weighted_total(self, values: dict[str, tf.Tensor]) -> tf.Tensor:
        """The student loss: each term's value times its weight at the current step."""
        step = self.optimizer.iterations
        return tf.add_n([tf.cast(t.weight_at(step), values[t.name].dtype) * values[t.name] for t in self.terms])

    # ------------------------------------------------------------------ Keras hooks
    def train_step(self, data: Any) -> dict[str, tf.Tensor]:
        x, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        images, index = (x["images"], x.get("index")) if isinstance(x, dict) else (x, None)
        views = [images, x["strong"]] if self.needs_strong_view else [images]
        teachers = [{role: precision.float32(model(view, training=self.teacher_training[role]))
                     for role, model in self.teacher_models.items()} for view in views]
        with tf.GradientTape() as tape:
            student = [precision.float32(self.student(view, training=True)) for view in views]
            batch = StepInputs(labels, student[0], teachers[0], index, True, self.optimizer.iterations,
                               student_strong=student[-1] if len(views) > 1 else None,
                               teachers_strong=teachers[-1] if len(views) > 1 else None)
            for term in self.terms:
                term.prepare(batch)
            logs: dict[str, tf.Tensor] = {}
            with tape.stop_recording():
                for term in self.auxiliary_terms:
                    logs.update(term.auxiliary_step(batch))
            values = {t.name: t.compute(batch) for t in self.terms}
            total = self.weighted_total(values)
            scaled = losses.scale_for_replicas(total)
        precision.apply_gradients(tape, scaled, self.variable_groups())
        if "ce" not in values:  # logged for every method, so runs compare
            values["ce"] = losses.cross_entropy(labels, batch.student["logits"])
        return self._update_metrics(labels, batch.student, {"loss": total, **values, **logs})

    def test_step(self, data: Any) -> dict[str, tf.Tensor]:
        """Evaluates the student alone: its cross-entropy (as ``loss``) and accuracy."""
        x, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        student = precision.float32(self(x, training=False))
        ce = losses.cross_entropy(labels, student["logits"])
        self.trackers["loss"].update_state(ce)
        self.trackers["ce"].update_state(ce)
        self.trackers["accuracy"].update_state(labels, student["logits"])
        return {"loss": self.trackers["loss"].result(), "ce": self.trackers["ce"].result(),
                "accuracy": self.trackers["accuracy"].result()}

    def _update_metrics(self, labels: tf.Tensor, student: dict[str, Any],
                        values: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        for name, value in values.items():
            self.trackers[name].update_state(value)
        self.trackers["accuracy"].update_state(labels, student["logits"])
        return {m.name: m.result() for m in self.metrics}


def _unique(layers: list[Any]) -> list[Any]:
    seen, found = set(), []
    for layer in layers:
        if id(layer) not in seen:
            seen.add(id(layer))
            found.append(layer)
    return found


def from_config(distill: Any, student: keras.Model, teachers: Sequence[keras.Model],
                steps_per_epoch: int = 1, train_labels: Any = None, sync_bn: bool = False,
                name: str = "distiller") -> Distiller:
    """The Distiller of a ``distill`` config section (uncompiled): the method (``distill.method``,
    compositions like ``cft+dkd`` included) with its options; ``teachers`` in command-line order
    (the method's teacher roles: mktn's autoencoder, then its classifier)."""
    from tfkd.distill import methods

    method = methods.resolve(distill.method)
    if len(teachers) != len(method.teachers):
        raise ModelError(f"method {distill.method} takes {len(method.teachers)} teacher(s), got {len(teachers)}")
    run = methods.RunInfo(steps_per_epoch)
    return Distiller(student, dict(zip(method.teachers, teachers)), method.terms(distill, run),
                     sync_bn=sync_bn, steps_per_epoch=steps_per_epoch, train_labels=train_labels, name=name)
