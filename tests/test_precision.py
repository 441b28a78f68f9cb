"""Mixed precision (``tfkd.precision``): bfloat16 steps give the float32 losses, float16 scales
its loss, what must be exact stays float32, and saved models are float32."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfkd import config, models, precision
from tfkd.distill import from_config
from tfkd.errors import ConfigError
from tfkd.teacher import ReconstructionTeacher


def _batch(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 32, 32, 3)).astype("float32"), rng.integers(0, 10, n).astype("int32")


def _one_step(policy, build, weights, x, y):
    """``build()`` under ``policy`` with ``weights``; the logged losses of one step on (x, y)."""
    with precision.policy_scope(policy):
        model = build()
        model.set_weights(weights)
        history = model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(len(y)), epochs=1,
                            verbose=0, shuffle=False).history
    return {k: v[0] for k, v in history.items()}, model


def _distiller(weights_from=None):
    keras.utils.set_random_seed(0)
    cfg = config.load(dotlist=["distill.method=cft"])
    teacher = models.get("resnet8", 10)
    teacher.trainable = False
    distiller = from_config(cfg.distill, models.get("resnet8", 10), [teacher], steps_per_epoch=10)
    distiller.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    distiller.build_all()
    return distiller


def _teacher():
    keras.utils.set_random_seed(0)
    teacher = ReconstructionTeacher(models.get("resnet8", 10))
    teacher.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    teacher(np.zeros((1, 32, 32, 3), "float32"))
    return teacher


@pytest.mark.parametrize("build", [_distiller, _teacher], ids=["cft distiller", "reconstruction teacher"])
def test_a_bfloat16_step_gives_the_float32_losses(build):
    x, y = _batch()
    start = build().get_weights()
    exact, exact_model = _one_step("float32", build, start, x, y)
    mixed, model = _one_step("mixed_bfloat16", build, start, x, y)
    assert set(mixed) == set(exact)
    for name, value in exact.items():
        # bfloat16 keeps 8 significant bits: about 0.4% per operation
        assert mixed[name] == pytest.approx(value, rel=3e-2, abs=3e-2), name
    # and the step itself: the weights moved as far as in float32
    moved = [np.abs(after - before).sum() for after, before in zip(exact_model.get_weights(), start)]
    mixed_moved = [np.abs(after - before).sum() for after, before in zip(model.get_weights(), start)]
    assert sum(moved) > 0 and sum(mixed_moved) == pytest.approx(sum(moved), rel=0.1)
    student = model.student if hasattr(model, "student") else model.backbone
    assert student.get_layer("logits").compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in model.trainable_variables)  # float32 master weights


def test_float16_scales_the_loss_and_keeps_the_terms_float32():
    with precision.policy_scope("mixed_float16"):
        distiller = _distiller()
        teacher = _teacher()
        teacher.compile(optimizer=keras.optimizers.SGD(0.1), backbone_optimizer=keras.optimizers.SGD(0.01))
    assert isinstance(distiller.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(teacher.optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(teacher.backbone_optimizer, keras.optimizers.LossScaleOptimizer)
    assert distiller.student.get_layer("logits").compute_dtype == "float16"
    for layer in distiller.adapters + [d for t in distiller.auxiliary_terms for d in t.auxiliary_layers]:
        assert precision.policies(layer) == {"float32"}, layer.name  # adapters, discriminators
    assert keras.config.dtype_policy().name == "float32"  # the scope restored the global policy
    out = precision.float32(distiller.student(np.zeros((2, 32, 32, 3), "float32")))
    assert out["logits"].dtype == tf.float32 and all(f.dtype == tf.float32 for f in out["features"])
    # a float16 step on the CPU: the scaled loss is unscaled before the update, which happens
    x, y = _batch(8)
    before = [w.copy() for w in distiller.student.get_weights()]
    with precision.policy_scope("mixed_float16"):
        logs = distiller.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"]) and logs["loss"] < 1e3
    assert any(not np.array_equal(a, b) for a, b in zip(distiller.student.get_weights(), before))


def test_apply_gradients_brings_every_group_to_its_own_loss_scale():
    a, b = tf.Variable([1.0]), tf.Variable([1.0])
    first = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(1.0), initial_scale=8.0)
    second = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.5), initial_scale=2.0)
    first.build([a])
    second.build([b])
    with tf.GradientTape() as tape:
        loss = 3.0 * a[0] + 5.0 * b[0]
    precision.apply_gradients(tape, loss, [(first, [a]), (second, [b])])
    # each optimizer unscales its own gradients: plain SGD steps of 1.0 * 3 and 0.5 * 5
    np.testing.assert_allclose([a.numpy()[0], b.numpy()[0]], [1.0 - 3.0, 1.0 - 2.5], rtol=1e-6)


def test_a_model_trained_in_mixed_precision_is_saved_float32(tmp_path):
    with precision.policy_scope("mixed_bfloat16"):
        student = models.get("resnet8", 10)
    assert "mixed_bfloat16" in precision.policies(student)
    saved = precision.with_policy(student)
    assert precision.policies(saved) == {"float32"}
    x = _batch(4)[0]
    with precision.policy_scope("float32"):
        reference = models.get("resnet8", 10)
    reference.set_weights(student.get_weights())
    np.testing.assert_allclose(saved(x)["logits"].numpy(), reference(x)["logits"].numpy(), atol=1e-6)
    teacher = precision.with_policy(ReconstructionTeacher(student))
    assert precision.policies(teacher) == {"float32"} and isinstance(teacher, ReconstructionTeacher)
    saved.save(tmp_path / "student.keras")
    assert precision.policies(keras.saving.load_model(tmp_path / "student.keras")) == {"float32"}


def test_mixed_precision_option_is_validated():
    assert config.load(dotlist=["mixed_precision=mixed_bfloat16"]).mixed_precision == "mixed_bfloat16"
    with pytest.raises(ConfigError, match="option 'mixed_precision' = 'bfloat16': expected one of float32"):
        config.load(dotlist=["mixed_precision=bfloat16"])
