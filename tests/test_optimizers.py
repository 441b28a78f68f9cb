"""tfkd.optimizers: the stages' SGD, its schedule and both weight-decay rules against closed forms
and a NumPy transcription of PyTorch's ``torch.optim.SGD`` update."""

import keras
import numpy as np
import pytest

from tfkd import config, optimizers, rundir


def _opt(**changes):
    return config.OptimizerConfig(**{"learning_rate": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                                     "schedule": "constant", "nesterov": False, **changes})


def _keras_steps(opt_config, w0, gradients):
    """``w`` after the stage optimizer of ``opt_config`` applied ``gradients`` one by one (in one
    traced loop: a thousand eager steps take seconds)."""
    import tensorflow as tf

    variable = keras.Variable(np.asarray(w0, np.float32))
    optimizer = optimizers.sgd(opt_config, opt_config.learning_rate)
    optimizer.build([variable])
    stacked = tf.constant(np.asarray(gradients, np.float32))

    @tf.function
    def run():
        for i in tf.range(tf.shape(stacked)[0]):
            optimizer.apply([stacked[i]], [variable])

    run()
    return np.asarray(variable)


def _torch_sgd(w0, gradients, lr, momentum, wd, nesterov):
    """torch.optim.SGD's step (dampening 0), in NumPy: d = g + wd*w; buf = m*buf + d (buf = d
    at the first step); w -= lr * (d + m*buf if nesterov else buf)."""
    w, buf = np.asarray(w0, np.float64), None
    for g in gradients:
        d = np.asarray(g, np.float64) + wd * w
        buf = d if buf is None else momentum * buf + d
        w = w - lr * (d + momentum * buf if nesterov else buf)
    return w


def test_step_schedule_decays_at_the_milestones():
    opt = config.OptimizerConfig(learning_rate=0.1, schedule="step", milestones=[2, 3], decay_rate=0.1)
    schedule = optimizers.learning_rate(opt, batch_size=64, steps_per_epoch=10, epochs=4)
    rates = [float(schedule(step)) for step in (0, 19, 21, 31)]
    assert rates == pytest.approx([0.05, 0.05, 0.005, 0.0005])


@pytest.mark.parametrize("nesterov", [False, True])
def test_a_zero_gradient_weight_follows_each_rules_closed_form(nesterov):
    """1,000 steps at lr 0.1, momentum 0.9, wd 5e-4 and zero loss gradient. Coupled: the state
    (w, buf) evolves linearly, (w, buf) <- A (w, buf), so w = (A^1000 (w0, 0))[0]; decoupled:
    w = w0 (1 - lr wd)^1000 (the momentum never moves)."""
    lr, m, wd, steps = 0.1, 0.9, 5e-4, 1000
    w0 = np.array([1.0, -2.0, 0.5])
    zeros = [np.zeros(3)] * steps
    if nesterov:  # buf' = wd w + m buf; w' = w - lr (wd w + m buf')
        a = np.array([[1 - lr * wd * (1 + m), -lr * m * m], [wd, m]])
    else:  # buf' = wd w + m buf; w' = w - lr buf'
        a = np.array([[1 - lr * wd, -lr * m], [wd, m]])
    kept_coupled = (np.linalg.matrix_power(a, steps) @ np.array([1.0, 0.0]))[0]
    kept_decoupled = (1 - lr * wd) ** steps
    coupled = _keras_steps(_opt(nesterov=nesterov, weight_decay_mode="coupled"), w0, zeros)
    decoupled = _keras_steps(_opt(nesterov=nesterov, weight_decay_mode="decoupled"), w0, zeros)
    np.testing.assert_allclose(coupled, kept_coupled * w0, rtol=2e-4)
    np.testing.assert_allclose(decoupled, kept_decoupled * w0, rtol=2e-4)
    # the figures: about 0.61 of the weight kept against about 0.95
    assert kept_coupled == pytest.approx(0.61, abs=0.01) and kept_decoupled == pytest.approx(0.951, abs=0.001)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("lr, momentum, wd", [(0.1, 0.9, 5e-4), (0.05, 0.9, 1e-3), (0.01, 0.0, 5e-4)])
def test_coupled_sgd_is_pytorchs_sgd(nesterov, lr, momentum, wd):
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4, 3))
    gradients = [rng.normal(size=(4, 3)) for _ in range(20)]
    ours = _keras_steps(_opt(learning_rate=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov,
                             weight_decay_mode="coupled"), w0, gradients)
    np.testing.assert_allclose(ours, _torch_sgd(w0, gradients, lr, momentum, wd, nesterov), rtol=1e-5, atol=1e-6)


def test_a_zero_rate_is_still_a_no_op_under_coupled_decay():
    """A frozen backbone's rate is 0 (``backbone_sgd``): L2 in the gradient is scaled by it too."""
    w0 = np.array([1.0, 2.0])
    np.testing.assert_array_equal(
        _keras_steps(_opt(learning_rate=0.0, weight_decay_mode="coupled"), w0, [np.ones(2)] * 5), w0)


def test_coupled_sgd_saves_and_loads_its_decay():
    optimizer = optimizers.sgd(_opt(weight_decay_mode="coupled", nesterov=True), 0.1)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(again) is optimizers.CoupledSGD
    assert (again.l2, again.momentum, again.nesterov) == (5e-4, 0.9, True) and again.weight_decay is None
    decoupled = optimizers.sgd(_opt(weight_decay_mode="decoupled"), 0.1)
    assert type(decoupled) is keras.optimizers.SGD and decoupled.weight_decay == 5e-4


def test_a_bad_weight_decay_mode_names_the_key():
    from tfkd.errors import ConfigError

    with pytest.raises(ConfigError, match="student.optimizer.weight_decay_mode.*coupled or decoupled"):
        config.load(dotlist=["student.optimizer.weight_decay_mode=l2"])


def test_a_run_recorded_before_the_option_counts_as_decoupled():
    """A changed default never resumes or reuses a run that decayed the other way."""
    before = {"student.optimizer.weight_decay": 5e-4}  # no weight_decay_mode key: Keras's rule
    now = {"student.optimizer.weight_decay": 5e-4, "student.optimizer.weight_decay_mode": "coupled",
           "student.optimizer.nesterov": True}
    assert rundir.differences(before, now) == [
        "student.optimizer.weight_decay_mode: 'decoupled' there, 'coupled' now"]
    assert rundir.differences(before, {**now, "student.optimizer.weight_decay_mode": "decoupled"}) == []
    assert rundir.differences({}, now) == []  # a record without settings compares none
