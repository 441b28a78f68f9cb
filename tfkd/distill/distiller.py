"""The Distiller: one Keras model and one ``train_step`` for every distillation method.

It holds the frozen teacher backbone(s), the student, the ConvBlock adapters and the
feature-map discriminators. Per batch:

1. the teachers run with ``training=False`` (their weights never change);
2. the student runs once, under the student's gradient tape;
3. **discriminator step** (when the adversarial term is on): teacher features are real, adapted
   student features (gradient stopped) fake; the discriminator optimizer updates the
   discriminators only;
4. **student step**: the weighted terms of the method (CE, KD, feature, adversarial against the
   just-updated discriminators, hint, attention), scaled once for the replica count; the
   student optimizer updates the student and the adapters only.

Steps 3 and 4 see the same student forward pass, which is what "one D step, then one student
step" computes, without running the student twice.

The discriminator step feeds real and fake maps as one batch in training mode, so its batch norm
normalizes both with the same statistics (a real-only or fake-only batch would let batch norm
erase the difference D must see); the student step queries the discriminator in inference mode, so
fake maps are normalized with D's moving statistics rather than with their own batch's.
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
import tensorflow as tf

from tfkd import losses
from tfkd.distill.adapters import ConvBlock
from tfkd.distill.discriminator import build_discriminator
from tfkd.distill.methods import LossWeights
from tfkd.errors import ModelError


def _feature_shapes(model: keras.Model) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in f.shape[1:]) for f in model.output["features"]]


def resolve_stages(stages: str, student: keras.Model, teacher: keras.Model) -> list[tuple[int, int]]:
    """Pairs (student stage, teacher stage) to distill: ``last``, ``all`` (aligned from the
    deepest stage up) or a comma list of stage numbers counted from 1 (``"2,3"``)."""
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
            raise ModelError(f"distill.stages = {stages!r}: expected last, all or stage numbers "
                             "like 2,3") from None
        if not picked or picked[0] < 1 or picked[-1] > depth:
            raise ModelError(f"distill.stages = {stages!r}: stages run from 1 to {depth} for "
                             f"{student.name} ({s_count} stages) and {teacher.name} ({t_count})")
    # stage k of the shallower model pairs with the stage as deep from the end in the other
    return [(s_count - depth + k - 1, t_count - depth + k - 1) for k in picked]


class Distiller(keras.Model):
    """Student + frozen teacher(s) + adapters + discriminators, trained by one ``train_step``.

    Args:
        student: a zoo model (``{"logits", "features"}`` output).
        teacher: the teacher backbone for the logits (KD), feature, hint and attention terms;
            None for the student alone.
        adversarial_teacher: the backbone whose features the discriminators see as real
            (MKTN's Teacher1); defaults to ``teacher`` (CFT).
        weights: the method's loss weights (default: CE only, the student alone).
        stages: which stages the feature and adversarial terms use (``resolve_stages``).
        temperature: KD temperature.
        gan_loss: ``lsgan`` or ``bce``.
        sync_bn: synchronized batch norm in adapters and discriminators.
        adapter_relu: end every ConvBlock adapter (feature, adversarial, hint) with a ReLU, so
            adapted maps are non-negative like the teacher's post-ReLU stage outputs.
        adversarial_warmup_steps: the student ignores the adversarial term for its first N
            steps (counted by the optimizer, so a resumed run keeps its place); the
            discriminators train from the first step.
        discriminator_width: multiplies the discriminators' hidden channels (capacity).
    """

    def __init__(self, student: keras.Model, teacher: keras.Model | None = None,
                 adversarial_teacher: keras.Model | None = None,
                 weights: LossWeights | None = None, stages: str = "last",
                 temperature: float = 4.0, gan_loss: str = "lsgan", sync_bn: bool = False,
                 adapter_relu: bool = False, adversarial_warmup_steps: int = 0,
                 discriminator_width: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.student = student
        weights = weights or LossWeights()
        self.loss_weights = weights
        self.temperature = float(temperature)
        self.gan_loss = gan_loss
        self.adversarial_warmup_steps = int(adversarial_warmup_steps)
        self.terms = weights.active()
        needs_teacher = any(t != "ce" for t in self.terms)
        if needs_teacher and teacher is None:
            raise ModelError(f"terms {self.terms} need a teacher")
        self.teacher = teacher
        self.adversarial_teacher = adversarial_teacher
        for model in (teacher, adversarial_teacher):
            if model is not None:
                model.trainable = False
        self.shares_adapters = adversarial_teacher is None or adversarial_teacher is teacher
        s_shapes = _feature_shapes(student)
        self.feature_adapters: list[ConvBlock] = []
        self.adversarial_adapters: list[ConvBlock] = []
        self.discriminators: list[keras.Model] = []
        self.feature_pairs: list[tuple[int, int]] = []
        self.adversarial_pairs: list[tuple[int, int]] = []
        if "feat" in self.terms or ("adv" in self.terms and self.shares_adapters):
            self.feature_pairs = resolve_stages(stages, student, teacher)
            t_shapes = _feature_shapes(teacher)
            self.feature_adapters = [ConvBlock(t_shapes[t], sync_bn, adapter_relu,
                                               name=f"feat_adapter_s{s + 1}")
                                     for s, t in self.feature_pairs]
        if "adv" in self.terms:
            adv_teacher = teacher if self.shares_adapters else adversarial_teacher
            self.adversarial_pairs = resolve_stages(stages, student, adv_teacher)
            a_shapes = _feature_shapes(adv_teacher)
            if self.shares_adapters:
                self.adversarial_adapters = self.feature_adapters
            else:
                self.adversarial_adapters = [ConvBlock(a_shapes[t], sync_bn, adapter_relu,
                                                       name=f"adv_adapter_s{s + 1}")
                                             for s, t in self.adversarial_pairs]
            self.discriminators = [build_discriminator(a_shapes[t], sync_bn, f"discriminator_s{s + 1}",
                                                       discriminator_width)
                                   for s, t in self.adversarial_pairs]
        self.hint_pair: tuple[int, int] | None = None
        self.hint_adapter: ConvBlock | None = None
        if "hint" in self.terms:
            s_mid, t_mid = len(s_shapes) // 2, len(_feature_shapes(teacher)) // 2
            self.hint_pair = (s_mid, t_mid)
            self.hint_adapter = ConvBlock(_feature_shapes(teacher)[t_mid], sync_bn, adapter_relu,
                                          name="hint_adapter")
        self.at_pairs: list[tuple[int, int]] = []
        if "at" in self.terms:
            self.at_pairs = resolve_stages("all", student, teacher)
            t_shapes = _feature_shapes(teacher)
            for s, t in self.at_pairs:
                if s_shapes[s][:2] != t_shapes[t][:2]:
                    raise ModelError(f"attention transfer needs equal spatial sizes: {student.name} "
                                     f"stage {s + 1} is {s_shapes[s][:2]}, {teacher.name} stage "
                                     f"{t + 1} is {t_shapes[t][:2]}")
        self.d_optimizer: keras.optimizers.Optimizer | None = None
        names = ["loss", *self.terms, "accuracy"]
        if "adv" in self.terms:
            names += ["d_loss", "d_real_acc", "d_fake_acc"]
        self.trackers = {n: keras.metrics.Mean(name=n) for n in names if n != "accuracy"}
        self.trackers["accuracy"] = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    # ------------------------------------------------------------------ building blocks
    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        return list(self.trackers.values())

    @property
    def adapters(self) -> list[ConvBlock]:
        """Every adapter once (CFT shares the feature and adversarial adapters)."""
        found = list(self.feature_adapters)
        if not self.shares_adapters:
            found += self.adversarial_adapters
        return found + ([self.hint_adapter] if self.hint_adapter is not None else [])

    @property
    def student_variables(self) -> list[tf.Variable]:
        """What the student step trains: the student and the adapters, nothing else."""
        variables = list(self.student.trainable_variables)
        for adapter in self.adapters:
            variables += adapter.trainable_variables
        return variables

    @property
    def discriminator_variables(self) -> list[tf.Variable]:
        """What the discriminator step trains."""
        return [v for d in self.discriminators for v in d.trainable_variables]

    def compile(self, optimizer: Any = "sgd", discriminator_optimizer: Any = None, **kwargs: Any) -> None:
        """``optimizer`` trains the student and adapters, ``discriminator_optimizer`` the
        discriminators (needed only when the adversarial term is on)."""
        super().compile(optimizer=optimizer, **kwargs)
        if self.discriminators and discriminator_optimizer is None:
            raise ValueError("the adversarial term needs a discriminator_optimizer")
        self.d_optimizer = keras.optimizers.get(discriminator_optimizer) if self.discriminators else None

    def build(self, input_shape: Any = None) -> None:
        """Builds the adapters from the student's stage shapes (the zoo models and the
        discriminators are functional models, built already)."""
        shapes = _feature_shapes(self.student)
        for adapter, (s, _) in zip(self.feature_adapters, self.feature_pairs):
            adapter.build((None, *shapes[s]))
        if not self.shares_adapters:
            for adapter, (s, _) in zip(self.adversarial_adapters, self.adversarial_pairs):
                adapter.build((None, *shapes[s]))
        if self.hint_adapter is not None:
            self.hint_adapter.build((None, *shapes[self.hint_pair[0]]))
        self.built = True

    def build_all(self) -> None:
        """Creates every variable (model, adapters, discriminators, both optimizers' slots).

        Call inside the strategy scope before ``fit``: two optimizers under MirroredStrategy
        fail on the first step unless both are built there, and a backup can only be restored
        into built models and optimizers.
        """
        self.build(self.student.input_shape)
        self.optimizer.build(self.student_variables)
        if self.d_optimizer is not None:
            self.d_optimizer.build(self.discriminator_variables)

    def call(self, images: tf.Tensor, training: bool = False) -> dict[str, Any]:
        """The student's outputs: what a Distiller predicts is what the student predicts."""
        return self.student(images, training=training)

    def _forward(self, images: tf.Tensor, training: bool) -> dict[str, Any]:
        outputs: dict[str, Any] = {"student": self(images, training=training)}
        if self.teacher is not None:
            outputs["teacher"] = self.teacher(images, training=False)
        if self.discriminators:
            outputs["adv_teacher"] = outputs["teacher"] if self.shares_adapters else \
                self.adversarial_teacher(images, training=False)
        return outputs

    def _adapted(self, adapters: Sequence[ConvBlock], pairs: Sequence[tuple[int, int]],
                 student_features: Sequence[tf.Tensor], training: bool) -> list[tf.Tensor]:
        return [adapter(student_features[s], training=training) for adapter, (s, _) in zip(adapters, pairs)]

    def _student_terms(self, labels: tf.Tensor, outputs: dict[str, Any], training: bool,
                       adapted_cache: dict[str, list[tf.Tensor]] | None = None) -> dict[str, tf.Tensor]:
        """The unscaled student loss terms of the active method."""
        s_out = outputs["student"]
        s_feats = s_out["features"]
        cache = adapted_cache if adapted_cache is not None else {}
        terms: dict[str, tf.Tensor] = {"ce": losses.cross_entropy(labels, s_out["logits"])}
        if "kd" in self.terms:
            terms["kd"] = losses.kd(outputs["teacher"]["logits"], s_out["logits"], self.temperature)
        if "feat" in self.terms:
            adapted = cache.get("feat") or self._adapted(self.feature_adapters, self.feature_pairs, s_feats, training)
            t_feats = outputs["teacher"]["features"]
            terms["feat"] = tf.add_n([losses.feature(a, t_feats[t]) for a, (_, t) in
                                      zip(adapted, self.feature_pairs)]) / len(adapted)
        if "adv" in self.terms:
            adapted = cache.get("adv") or self._adapted(self.adversarial_adapters, self.adversarial_pairs,
                                                        s_feats, training)
            terms["adv"] = tf.add_n([losses.adversarial(d(a, training=False), self.gan_loss)
                                     for d, a in zip(self.discriminators, adapted)]) / len(adapted)
        if "hint" in self.terms:
            s, t = self.hint_pair
            terms["hint"] = losses.feature(self.hint_adapter(s_feats[s], training=training),
                                           outputs["teacher"]["features"][t])
        if "at" in self.terms:
            t_feats = outputs["teacher"]["features"]
            terms["at"] = tf.add_n([losses.attention_transfer(s_feats[s], t_feats[t]) for s, t in self.at_pairs])
        return terms

    def weighted_total(self, terms: dict[str, tf.Tensor]) -> tf.Tensor:
        """The student loss: the sum of each term times its weight (the adversarial weight is 0
        until ``adversarial_warmup_steps`` optimizer steps have been taken)."""
        parts = []
        for name, value in terms.items():
            weight = getattr(self.loss_weights, name)
            if name == "adv" and self.adversarial_warmup_steps > 0:
                warm = self.optimizer.iterations >= self.adversarial_warmup_steps
                weight = weight * tf.cast(warm, value.dtype)
            parts.append(weight * value)
        return tf.add_n(parts)

    def discriminator_step(self, real: Sequence[tf.Tensor], fake: Sequence[tf.Tensor]) -> dict[str, tf.Tensor]:
        """One update of the discriminators on teacher (real) vs adapted student (fake) maps."""
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
        variables = self.discriminator_variables
        self.d_optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        return {"d_loss": d_loss, "d_real_acc": tf.add_n(real_acc) / len(real_acc),
                "d_fake_acc": tf.add_n(fake_acc) / len(fake_acc)}

    # ------------------------------------------------------------------ Keras hooks
    def train_step(self, data: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            outputs = self._forward(images, training=True)
            cache: dict[str, list[tf.Tensor]] = {}
            d_logs: dict[str, tf.Tensor] = {}
            if self.discriminators:
                s_feats = outputs["student"]["features"]
                cache["adv"] = self._adapted(self.adversarial_adapters, self.adversarial_pairs, s_feats, True)
                if self.shares_adapters:
                    cache["feat"] = cache["adv"]
                real = [outputs["adv_teacher"]["features"][t] for _, t in self.adversarial_pairs]
                with tape.stop_recording():
                    d_logs = self.discriminator_step(real, cache["adv"])
            terms = self._student_terms(labels, outputs, True, cache)
            total = self.weighted_total(terms)
            scaled = losses.scale_for_replicas(total)
        variables = self.student_variables
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        return self._update_metrics(labels, outputs, {"loss": total, **terms, **d_logs})

    def test_step(self, data: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Evaluates the student alone: its cross-entropy (as ``loss``) and accuracy."""
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        student = self(images, training=False)
        ce = losses.cross_entropy(labels, student["logits"])
        self.trackers["loss"].update_state(ce)
        self.trackers["ce"].update_state(ce)
        self.trackers["accuracy"].update_state(labels, student["logits"])
        return {"loss": self.trackers["loss"].result(), "ce": self.trackers["ce"].result(),
                "accuracy": self.trackers["accuracy"].result()}

    def _update_metrics(self, labels: tf.Tensor, outputs: dict[str, Any],
                        values: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        for name, value in values.items():
            self.trackers[name].update_state(value)
        self.trackers["accuracy"].update_state(labels, outputs["student"]["logits"])
        return {m.name: m.result() for m in self.metrics}
