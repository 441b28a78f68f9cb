import keras
import numpy as np
import pytest
import tensorflow as tf

from tfkd import config, losses, models
from tfkd.distill import ConvBlock, build_discriminator, from_config, resolve, resolve_stages
from tfkd.distill.methods import RunInfo
from tfkd.errors import ModelError


def rng_arrays(*shapes, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=s) * scale).astype(np.float32) for s in shapes]


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ------------------------------------------------------------------ loss terms vs NumPy
def test_kd_matches_numpy_and_keras_logits_distillation():
    t, s = rng_arrays((8, 10), (8, 10), scale=3.0)
    tau = 4.0
    pt, ps = softmax(t / tau), softmax(s / tau)
    expected = tau**2 * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))
    np.testing.assert_allclose(float(losses.kd(t, s, tau)), expected, rtol=1e-5)
    # with a KLDivergence *instance*: the default loss="kl_divergence" string resolves to the
    # bare function, which LogitsDistillation then applies to raw logits (no softmax)
    keras_kd = keras.distillation.LogitsDistillation(temperature=tau, loss=keras.losses.KLDivergence())
    np.testing.assert_allclose(float(losses.kd(t, s, tau)), float(keras_kd.compute_loss(t, s)), rtol=1e-4)


def test_feature_and_hint_loss_match_numpy():
    a, b = rng_arrays((2, 8, 8, 64), (2, 8, 8, 64), seed=1)
    np.testing.assert_allclose(float(losses.feature(a, b)), np.mean((a - b) ** 2), rtol=1e-5)


@pytest.mark.parametrize("kind", ["lsgan", "bce"])
def test_gan_losses_match_numpy(kind):
    real, fake = rng_arrays((16, 1), (16, 1), seed=2, scale=2.0)
    if kind == "lsgan":
        d_expected = np.mean((real - 1) ** 2) + np.mean(fake**2)
        g_expected = np.mean((fake - 1) ** 2)
    else:
        log_sig = lambda z: -np.log1p(np.exp(-z))  # noqa: E731
        d_expected = -np.mean(log_sig(real)) - np.mean(log_sig(-fake))
        g_expected = -np.mean(log_sig(fake))
    np.testing.assert_allclose(float(losses.discriminator_loss(real, fake, kind)), d_expected, rtol=1e-5)
    np.testing.assert_allclose(float(losses.adversarial(fake, kind)), g_expected, rtol=1e-5)


def test_attention_transfer_matches_numpy():
    fs, ft = rng_arrays((4, 8, 8, 16), (4, 8, 8, 64), seed=3)

    def at(f):
        a = (f**2).mean(-1).reshape(len(f), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    np.testing.assert_allclose(float(losses.attention_transfer(fs, ft)), np.mean((at(fs) - at(ft)) ** 2),
                               rtol=1e-5)


def weights(method, *settings):
    """{term: weight} of ``method`` with ``distill.*`` settings (the old flat spellings map on)."""
    cfg = config.load(dotlist=[f"distill.method={method}", *settings])
    return {t.name: t.weight for t in resolve(method).terms(cfg.distill, RunInfo())}


def test_method_table():
    assert list(weights("student")) == ["ce"]
    kd = weights("kd")
    assert (kd["ce"], kd["kd"]) == pytest.approx((0.1, 0.9))
    cft = weights("cft")
    assert (cft["ce"], cft["feat"], cft["adv"], cft["kd"]) == (1.0, 1.0, 0.1, 0.9)  # METHOD.md's, gamma tuned
    assert list(weights("cft", "distill.gamma=0")) == ["ce", "feat", "adv"]
    on_kd = weights("cft", "distill.ce_weight=0.1")
    assert (on_kd["ce"], on_kd["kd"]) == pytest.approx((kd["ce"], kd["kd"]))
    assert list(weights("cft", "distill.ce_weight=0")) == ["kd", "feat", "adv"]
    assert weights("kd", "distill.cft.ce_weight=0.5")["ce"] == pytest.approx(0.1)  # kd keeps its own weighting
    assert weights("at")["at"] == 1000.0 and list(weights("fitnet")) == ["ce", "hint"]


# ------------------------------------------------------------------ building blocks
def test_convblock_maps_channels_and_resizes():
    block = ConvBlock((8, 8, 64))
    out = block(np.zeros((2, 16, 16, 16), np.float32))
    assert tuple(out.shape) == (2, 8, 8, 64)
    assert not block.conv.use_bias
    clone = ConvBlock.from_config(block.get_config())
    assert clone.target_shape == [8, 8, 64] and not clone.relu


def test_convblock_relu_is_the_plain_block_clipped_at_zero():
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 16)).astype(np.float32)
    plain, rectified = ConvBlock((8, 8, 32)), ConvBlock((8, 8, 32), relu=True)
    plain.build(x.shape), rectified.build(x.shape)
    rectified.set_weights(plain.get_weights())
    expected = np.maximum(np.asarray(plain(x, training=True)), 0.0)
    assert (np.asarray(plain(x, training=True)) < 0).mean() > 0.3  # batch norm: about half negative
    np.testing.assert_allclose(np.asarray(rectified(x, training=True)), expected, atol=1e-6)
    assert ConvBlock.from_config(rectified.get_config()).relu


@pytest.mark.parametrize("method", ["cft", "mktn", "fitnet"])
def test_adapter_relu_reaches_every_adapter(method):
    for relu in (False, True):
        distiller = make_distiller(method, adapter_relu=relu)
        assert distiller.adapters and all(a.relu is relu for a in distiller.adapters)


def test_discriminator_gives_one_logit_per_map():
    disc = build_discriminator((8, 8, 64))
    assert tuple(disc(np.zeros((3, 8, 8, 64), np.float32)).shape) == (3, 1)
    convs = [l for l in disc.layers if isinstance(l, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [32, 16, 1] and convs[1].strides == (2, 2)


@pytest.mark.parametrize("width, filters, params", [(0.25, [8, 4, 1], 4_957), (2.0, [64, 32, 1], 55_777)])
def test_discriminator_width_scales_its_hidden_channels(width, filters, params):
    disc = build_discriminator((8, 8, 64), width=width)
    convs = [l for l in disc.layers if isinstance(l, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == filters
    # conv1 (3*3*64*h1 + h1) + conv2 (3*3*h1*h2, no bias) + bn (4*h2) + conv3 (3*3*h2 + 1)
    assert disc.count_params() == params


def make_distiller(method="cft", teacher_name="resnet14", student_name="resnet8", sync_bn=False,
                   seed=0, gan_loss="lsgan", stages="last", adapter_relu=False, warmup_steps=0, settings=()):
    """A built, compiled Distiller of ``method`` (``warmup_steps``: the adversarial warm-up, at one
    step per epoch); mktn's first teacher is the reconstruction one."""
    keras.utils.set_random_seed(seed)
    namespace = method if method in ("cft", "mktn") else "cft"
    cfg = config.load(dotlist=[f"distill.method={method}", f"distill.{namespace}.gan_loss={gan_loss}",
                               f"distill.{namespace}.stages={stages}",
                               f"distill.{namespace}.adapter_relu={str(adapter_relu).lower()}",
                               f"distill.{namespace}.adv_warmup_epochs={warmup_steps}",
                               f"distill.fitnet.adapter_relu={str(adapter_relu).lower()}", *settings])
    count = len(resolve(method).teachers)
    teachers = [models.get(teacher_name, 10, sync_bn=sync_bn) for _ in range(count)]
    student = models.get(student_name, 10, sync_bn=sync_bn)
    distiller = from_config(cfg.distill, student, teachers, steps_per_epoch=1,
                            train_labels=np.arange(64) % 10, sync_bn=sync_bn)
    distiller.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
                      discriminator_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5))
    distiller.build_all()
    return distiller


def adversarial(distiller):
    return next(t for t in distiller.terms if t.name == "adv")


def batch(n=16, seed=0):
    x, = rng_arrays((n, 32, 32, 3), seed=seed)
    return x, (np.arange(n) % 10).astype(np.int32)


def snapshot(variables):
    return [v.numpy().copy() for v in variables]


def changed(before, variables):
    return [not np.array_equal(b, v.numpy()) for b, v in zip(before, variables)]


def test_discriminator_step_changes_only_discriminator_weights():
    distiller = make_distiller()
    x, _ = batch()
    others = distiller.student.weights + distiller.teacher().weights + [w for a in distiller.adapters for w in a.weights]
    before_others, before_d = snapshot(others), snapshot(distiller.discriminator_variables)
    real = [distiller.teacher()(x)["features"][-1]]
    fake = [distiller.adapters[0](distiller.student(x)["features"][-1])]
    logs = adversarial(distiller).discriminate(real, fake)
    assert set(logs) == {"d_loss", "d_real_acc", "d_fake_acc"}
    assert all(changed(before_d, distiller.discriminator_variables))
    assert not any(changed(before_others, others))


def test_adversarial_warmup_leaves_the_adversarial_term_out_until_the_step_count():
    distiller = make_distiller("cft", warmup_steps=3)
    w = distiller.weights_by_term
    terms = {"ce": tf.constant(1.5), "kd": tf.constant(2.0), "feat": tf.constant(0.7), "adv": tf.constant(0.9)}
    without_adv = 1.5 * w["ce"] + 2.0 * w["kd"] + 0.7 * w["feat"]
    for step, expected in ((0, without_adv), (2, without_adv), (3, without_adv + 0.9 * w["adv"]),
                           (10, without_adv + 0.9 * w["adv"])):
        distiller.optimizer.iterations.assign(step)
        assert float(distiller.weighted_total(terms)) == pytest.approx(expected, rel=1e-6), step
    (x,), y = rng_arrays((8, 32, 32, 3), seed=1), np.arange(8) % 10
    distiller.optimizer.iterations.assign(0)
    logs = distiller.train_on_batch(x, y, return_dict=True)  # the discriminator trains during warm-up
    assert int(distiller.d_optimizer.iterations) == 1 and logs["adv"] > 0


def test_student_step_trains_student_and_adapters_only_and_teacher_never_changes():
    distiller = make_distiller()
    student_vars = {id(v) for v in distiller.student_variables}
    expected = {id(v) for v in distiller.student.trainable_variables} | {
        id(v) for a in distiller.adapters for v in a.trainable_variables}
    assert student_vars == expected
    assert not student_vars & {id(v) for v in distiller.discriminator_variables}
    assert not student_vars & {id(v) for v in distiller.teacher().weights}
    teacher_before = snapshot(distiller.teacher().weights)  # moving BN statistics included
    student_before = snapshot(distiller.student_variables)
    x, y = batch(32)
    distiller.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert not any(changed(teacher_before, distiller.teacher().weights))
    assert all(changed(student_before, distiller.student_variables))


def test_discriminator_learns_to_separate_real_from_fake_on_a_toy_problem():
    """Real maps have a bright centre, fake ones a bright border: D must learn the layout."""
    distiller = make_distiller()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:8, :8]
    centre = ((np.abs(yy - 3.5) < 2) & (np.abs(xx - 3.5) < 2)).astype(np.float32)[None, :, :, None]
    noise = lambda: rng.normal(0, 0.3, (32, 8, 8, 64)).astype(np.float32)  # noqa: E731
    for _ in range(60):
        logs = adversarial(distiller).discriminate([noise() + centre], [noise() + (1 - centre)])
    assert float(logs["d_real_acc"]) > 0.9 and float(logs["d_fake_acc"]) > 0.9
    assert float(logs["d_loss"]) < 0.2


def test_fit_logs_every_term_and_discriminator_accuracy():
    distiller = make_distiller()
    x, y = batch(32)
    history = distiller.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert {"loss", "ce", "kd", "feat", "adv", "d_loss", "d_real_acc", "d_fake_acc", "accuracy"} <= set(history)
    assert history["loss"][0] == pytest.approx(
        history["ce"][0] + history["feat"][0] + 0.1 * history["adv"][0] + 0.9 * history["kd"][0], rel=1e-4)


@pytest.mark.parametrize("method", ["student", "kd", "fitnet", "at", "mktn"])
def test_every_method_trains_through_the_same_step(method):
    distiller = make_distiller(method)
    x, y = batch(32)
    history = distiller.fit(x, y, batch_size=16, epochs=2, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    if method == "mktn":  # the adversarial teacher is Teacher1, the feature teacher Teacher2
        feat = next(t for t in distiller.terms if t.name == "feat")
        adv = adversarial(distiller)
        assert (adv.teacher, feat.teacher) == ("autoencoder", "classifier") and adv.adapted is not feat.adapted
        assert distiller.teacher("autoencoder") is not distiller.teacher("classifier")
        assert len(distiller.adapters) == 2


def test_stage_alignment():
    student, teacher = models.get("resnet8", 10), models.get("vgg8", 10)
    assert resolve_stages("last", student, teacher) == [(2, 4)]
    assert resolve_stages("all", student, teacher) == [(0, 2), (1, 3), (2, 4)]
    assert resolve_stages("2,3", student, teacher) == [(1, 3), (2, 4)]
    with pytest.raises(ModelError, match="stages run from 1 to 3"):
        resolve_stages("4", student, teacher)
    with pytest.raises(ModelError, match="expected last, all"):
        resolve_stages("deep", student, teacher)
    with pytest.raises(ModelError, match="attention transfer needs equal spatial sizes"):
        at = config.load(dotlist=["distill.method=at"]).distill
        from_config(at, student, [teacher])


def test_resume_restores_both_optimizers_state(tmp_path):
    distiller = make_distiller(seed=1)
    x, y = batch(32)
    distiller.fit(x, y, batch_size=16, epochs=2, verbose=0)
    distiller.save_weights(tmp_path / "ckpt.weights.h5")
    restored = make_distiller(seed=2)
    assert int(restored.optimizer.iterations) == 0 and int(restored.d_optimizer.iterations) == 0
    restored.load_weights(tmp_path / "ckpt.weights.h5")
    for name in ("optimizer", "d_optimizer"):
        original, loaded = getattr(distiller, name), getattr(restored, name)
        assert int(loaded.iterations) == int(original.iterations) == 4
        slots = [v for v in original.variables if "iteration" not in v.name and "learning_rate" not in v.name]
        assert slots and any(np.abs(v.numpy()).max() > 0 for v in slots), "momentum/Adam moments are non-zero"
        for a, b in zip(original.variables, loaded.variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(distiller.weights, restored.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_two_replicas_give_the_same_losses_and_weights_as_one_device(two_replicas, one_step):
    x, y = batch(16, seed=5)
    weights = make_distiller(sync_bn=True).get_weights()
    build = lambda: make_distiller(sync_bn=True)  # noqa: E731
    one_logs, one_w = one_step(tf.distribute.OneDeviceStrategy("/cpu:0"), build, weights, x, y)
    two_logs, two_w = one_step(two_replicas, build, weights, x, y)
    for key in ("loss", "ce", "feat", "adv", "d_loss", "d_real_acc", "d_fake_acc"):
        np.testing.assert_allclose(two_logs[key][0], one_logs[key][0], rtol=1e-5, atol=1e-5, err_msg=key)
    for a, b in zip(one_w, two_w):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
