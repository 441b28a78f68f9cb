"""The method zoo: every formula against NumPy on fixed inputs, composition, the option
namespaces, MirroredStrategy, and resuming with every term's state."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfkd import config, losses, models
from tfkd.distill import from_config, methods, resolve
from tfkd.distill.methods import RunInfo, crd, ctkd, dist, dkd, mlkd, nkd, ofd, reviewkd, sdd, wttm
from tfkd.errors import ConfigError, ModelError

pytestmark = pytest.mark.xdist_group("methods")


def arrays(*shapes, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=s) * scale).astype(np.float32) for s in shapes]


def softmax(z, axis=-1):
    e = np.exp(z - z.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def kl(p, q):
    return np.sum(p * (np.log(p) - np.log(q)), -1)


# ----------------------------------------------------------------------------- formulas vs NumPy
def test_dkd_matches_the_authors_formula():
    t, s = arrays((8, 10), (8, 10), scale=3.0)
    y = np.arange(8) % 10
    tau, alpha, beta = 4.0, 1.0, 8.0
    gt = np.eye(10)[y].astype(bool)
    ps, pt = softmax(s / tau), softmax(t / tau)
    bs = np.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], 1)
    bt = np.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], 1)
    tckd = kl(bt, bs).sum() * tau**2 / 8
    pt2, ps2 = softmax(t / tau - 1000.0 * gt), softmax(s / tau - 1000.0 * gt)
    nckd = np.sum(pt2 * (np.log(pt2 + 1e-30) - np.log(ps2 + 1e-30))) * tau**2 / 8
    np.testing.assert_allclose(float(dkd.dkd_loss(t, s, y, alpha, beta, tau)), alpha * tckd + beta * nckd, rtol=1e-4)


def test_dkd_warms_up_linearly_over_its_epochs():
    term = dkd.DKD(1.0, 8.0, 4.0, warmup_epochs=20, steps_per_epoch=10)
    for step, expected in ((0, 1 / 20), (9, 1 / 20), (10, 2 / 20), (195, 20 / 20), (1000, 1.0)):
        assert float(term.weight_at(tf.constant(step))) == pytest.approx(expected), step


def test_a_warmup_shorter_than_an_epoch_rises_every_step():
    """Under one epoch, a once-per-epoch rise would be the full weight from the first step."""
    steps_per_epoch, warmup = 30, 2 / 3  # 20 steps of warm-up
    term = dkd.DKD(1.0, 8.0, 4.0, warmup_epochs=warmup, steps_per_epoch=steps_per_epoch)
    steps = np.arange(60)
    expected = np.minimum((steps + 1) / steps_per_epoch / warmup, 1.0)
    got = np.array([float(term.weight_at(tf.constant(int(s)))) for s in steps])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[0] == pytest.approx(1 / 20) and got[18] < 1.0 and got[19] == pytest.approx(1.0)


def test_dist_matches_the_authors_formula():
    t, s = arrays((16, 10), (16, 10), seed=1, scale=2.0)
    tau = 4.0
    ps, pt = softmax(s / tau), softmax(t / tau)

    def pearson(a, b):
        a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-8)

    inter, intra = 1 - pearson(ps, pt).mean(), 1 - pearson(ps.T, pt.T).mean()
    expected = tau**2 * (1.0 * inter + 1.0 * intra)
    np.testing.assert_allclose(float(dist.dist_loss(t, s, 1.0, 1.0, tau)), expected, rtol=1e-5)


def test_logit_standardization_z_scores_before_the_softmax():
    t, s = arrays((8, 10), (8, 10), seed=2, scale=5.0)

    def z(a):
        return (a - a.mean(1, keepdims=True)) / (a.std(1, ddof=1, keepdims=True) + 1e-7)

    np.testing.assert_allclose(np.asarray(losses.standardize(t)), z(t), rtol=1e-5, atol=1e-6)
    expected = 2.0**2 * kl(softmax(z(t) / 2.0), softmax(z(s) / 2.0)).mean()
    cfg = config.load(dotlist=["distill.method=kd+ls"])
    kd_term = [term for term in resolve("kd+ls").terms(cfg.distill, RunInfo()) if term.name == "kd"][0]
    assert (kd_term.weight, kd_term.temperature, kd_term.standardize) == (9.0, 2.0, True)
    from tfkd.distill.terms import StepInputs

    value = kd_term.compute(StepInputs(None, {"logits": s}, {"teacher": {"logits": t}}))
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)


def test_ofd_margin_is_the_mean_below_zero_of_the_batch_norm_gaussian():
    from scipy.stats import norm

    gamma, beta = np.array([1.0, -2.0, 0.5, 0.1]), np.array([0.0, 1.0, -0.3, 2.0])
    found = ofd.margins(gamma, beta)
    for g, b, m in zip(gamma, beta, found):
        s = abs(g)
        if norm.cdf(-b / s) > 0.001:  # E[x | x < 0] of N(b, s^2), by numerical integration
            xs = np.linspace(b - 12 * s, 0, 200001)
            density = norm.pdf(xs, b, s)
            assert m == pytest.approx(np.trapezoid(xs * density, xs) / np.trapezoid(density, xs), rel=1e-4)
        else:
            assert m == pytest.approx(-3 * s)


def test_ofd_partial_l2_matches_numpy():
    source, target = arrays((4, 3, 3, 5), (4, 3, 3, 5), seed=3)
    margin = np.array([-0.5, -0.2, -1.0, -0.1, -0.3], np.float32)
    hinge = (source > margin) & (target <= margin)
    below = (source > target) & (target > margin) & (target <= 0)
    loss = (source - margin) ** 2 * hinge + (source - target) ** 2 * below + (source - target) ** 2 * (target > 0)
    np.testing.assert_allclose(float(ofd.partial_l2(source, target, margin)), np.abs(loss).mean(0).sum(), rtol=1e-5)


def _adaptive_pool_numpy(x, out):
    """PyTorch's adaptive_avg_pool2d (NHWC): bin i spans floor(i*H/out) to ceil((i+1)*H/out)."""
    n, h, w, c = x.shape
    result = np.zeros((n, out, out, c))
    for i in range(out):
        for j in range(out):
            rows = slice(int(np.floor(i * h / out)), int(np.ceil((i + 1) * h / out)))
            cols = slice(int(np.floor(j * w / out)), int(np.ceil((j + 1) * w / out)))
            result[:, i, j] = x[:, rows, cols].mean((1, 2))
    return result


def _hcl_numpy(student, teacher):
    total = 0.0
    for fs, ft in zip(student, teacher):
        loss, weight, norm_ = ((fs - ft) ** 2).mean(), 1.0, 1.0
        for level in (4, 2, 1):
            if level >= fs.shape[1]:
                continue
            weight /= 2
            loss += ((_adaptive_pool_numpy(fs, level) - _adaptive_pool_numpy(ft, level)) ** 2).mean() * weight
            norm_ += weight
        total += loss / norm_
    return total


@pytest.mark.parametrize("sizes, batch", [((32, 16, 8), 2), ((14, 7), 3), ((6, 3), 5), ((7, 2), 1)])
def test_reviewkd_hierarchical_context_loss_matches_numpy_at_any_map_size(sizes, batch):
    """CIFAR's 32/16/8 maps, a 224-px student's 14/7, and 6, 3 and 2: sizes the 4x4 and 2x2
    pools do not divide, where the authors' adaptive bins overlap."""
    shapes = [(batch, s, s, 3) for s in sizes] + [(batch, 1, 1, 3)]  # the pooled feature: no pyramid
    student = arrays(*shapes, seed=4)
    teacher = arrays(*shapes, seed=5)
    np.testing.assert_allclose(float(reviewkd.hcl(student, teacher)), _hcl_numpy(student, teacher), rtol=1e-5)


def test_adaptive_pooling_bins_overlap_like_pytorchs():
    x = np.arange(7, dtype=np.float32).reshape(1, 7, 1, 1) * np.ones((1, 1, 7, 1), np.float32)
    pooled = np.asarray(reviewkd.adaptive_average_pool(x, 4))[0, :, 0, 0]
    np.testing.assert_allclose(pooled, [0.5, 2.0, 4.0, 5.5])  # rows 0-1, 1-3, 3-5, 5-6


@pytest.mark.parametrize("batch, classes, temperature, gamma", [(6, 10, 3.0, 3.5), (1, 100, 1.0, 1.5), (17, 5, 4.0, 1.0)])
def test_nkd_loss_matches_numpy_with_the_target_column_removed(batch, classes, temperature, gamma):
    """The authors' NKD: -p_t[y] log p_s[y] at T 1, then -gamma T^2 sum_k q_t log q_s over the
    K - 1 non-target logits (the target column deleted, the rest re-softmaxed)."""
    t, s = arrays((batch, classes), (batch, classes), seed=9, scale=3.0)
    y = np.arange(batch) % classes
    rows = np.arange(batch)
    target = -(softmax(t)[rows, y] * np.log(softmax(s)[rows, y])).mean()
    t_rest = np.stack([np.delete(t[i], y[i]) for i in rows])
    s_rest = np.stack([np.delete(s[i], y[i]) for i in rows])
    non_target = -gamma * temperature**2 * (softmax(t_rest / temperature)
                                            * np.log(softmax(s_rest / temperature))).sum(-1).mean()
    got = float(nkd.nkd_loss(t, s, y.astype(np.int32), temperature, gamma))
    np.testing.assert_allclose(got, target + non_target, rtol=1e-5)


@pytest.mark.parametrize("batch, classes, gamma", [(6, 10, 0.2), (1, 100, 0.1), (9, 5, 1.0)])
def test_wttm_loss_matches_numpy(batch, classes, gamma):
    """The authors' WTTM: p_t^gamma renormalized against the unscaled student, each example's
    KL weighted by U = sum_k p_t^gamma; gamma 1 is plain KL at temperature 1."""
    t, s = arrays((batch, classes), (batch, classes), seed=10, scale=3.0)
    powered = softmax(t) ** gamma
    u = powered.sum(-1)
    q = powered / u[:, None]
    expected = (u * (q * (np.log(q) - np.log(softmax(s)))).sum(-1)).mean()
    np.testing.assert_allclose(float(wttm.wttm_loss(t, s, gamma)), expected, rtol=1e-5)


def _mlkd_numpy(tw, sw, ts, ss, y, quirk=True):
    """MLKD's loss as its authors' KD_ours.forward_train writes it out, temperature by temperature."""
    batch, classes = tw.shape

    def kd(s, t, T):
        return T * T * kl(softmax(t / T), softmax(s / T)).mean()

    def cc(s, t, T):
        p, q = softmax(t / T), softmax(s / T)
        return ((p.T @ p - q.T @ q) ** 2).sum() / classes

    def bc(s, t, T):
        p, q = softmax(t / T), softmax(s / T)
        return ((p @ p.T - q @ q.T) ** 2).sum() / batch

    def ce(s):
        return -np.log(softmax(s)[np.arange(batch), y]).mean()

    p = softmax(tw)
    mask = p.max(1) <= np.percentile(p.max(1), 50)
    class_mask = p.sum(0) <= np.percentile(p.sum(0), 50)
    temps = (4.0, 3.0, 5.0, 2.0, 6.0)
    kd_weak = sum(0.9 * (kd(sw, tw, T) * mask).mean() for T in temps)
    strong = [(ss, ts)] * 3 + ([(sw, tw)] * 2 if quirk else [(ss, ts)] * 2)
    kd_strong = sum(0.9 * kd(s, t, T) for (s, t), T in zip(strong, temps))
    cc_weak = sum(0.9 * (cc(sw, tw, T) * class_mask).mean() for T in temps)
    bc_weak = sum(0.9 * (bc(sw, tw, T) * mask).mean() for T in temps)
    return 0.1 * (ce(sw) + ce(ss)) + kd_weak + kd_strong + cc_weak + bc_weak


@pytest.mark.parametrize("batch", [2, 5, 16])
@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("quirk", [True, False])
def test_mlkd_loss_matches_the_authors_forward_train(batch, classes, quirk):
    """CE on both views, then at T 4, 3, 5, 2, 6: the weak view's KD times the fraction of the
    batch under the median teacher confidence, the strong view's KD (at 2 and 6 the authors' code
    reads the weak view: the quirk kept by default), the class correlation times the fraction of
    classes under the median class sum, the batch correlation times the confidence fraction."""
    from tfkd.distill.terms import StepInputs

    tw, sw, ts, ss = arrays(*[(batch, classes)] * 4, seed=11 + batch, scale=3.0)
    y = (np.arange(batch) % classes).astype(np.int32)
    settings = [] if quirk else ["distill.mlkd.strong_weak_temperatures=[]"]
    cfg = config.load(dotlist=["distill.method=mlkd", *settings])
    found = resolve("mlkd").terms(cfg.distill, RunInfo())
    assert [t.name for t in found] == ["ce_views", "mlkd_kd", "mlkd_cc", "mlkd_bc"]
    assert all(t.needs_strong_view for t in found)
    batch_inputs = StepInputs(y, {"logits": tf.constant(sw)}, {"teacher": {"logits": tf.constant(tw)}},
                              student_strong={"logits": tf.constant(ss)},
                              teachers_strong={"teacher": {"logits": tf.constant(ts)}})
    got = sum(t.weight * float(t.compute(batch_inputs)) for t in found)
    np.testing.assert_allclose(got, _mlkd_numpy(tw, sw, ts, ss, y, quirk), rtol=1e-5)


def test_mlkd_masks_keep_what_is_at_most_the_median():
    """np.percentile's median: the middle value of an odd count, the mean of the two middle ones
    of an even count; ties at the median are kept."""
    logits = np.log(np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.55, 0.45]], np.float32))
    kept, kept_classes = (float(v) for v in mlkd.masks(tf.constant(logits)))
    assert kept == 0.5 and kept_classes == 0.5  # 0.55, 0.6 under 0.65; class 1 under class 0
    kept, _ = (float(v) for v in mlkd.masks(tf.constant(logits[:3])))
    assert kept == pytest.approx(2 / 3)  # 0.6 and 0.7 (the median itself)


def test_ctkd_curriculum_and_temperature_match_the_authors_formulas():
    """lambda(e) = (cos(pi min(e, 10) / 10) + 1) / 2 (0 - (-1)) + (-1) at 1-based epochs; T =
    1 + 20 sigmoid(g), g = 1 at first (T about 15.6); the KD term is T^2 KL at that T."""
    steps_per_epoch = 7
    for step in (0, 6, 7, 30, 69, 70, 500):
        epoch = step // steps_per_epoch + 1
        expected = (math.cos(math.pi * min(epoch, 10) / 10) + 1) / 2 * (0 - (-1)) + (-1)
        got = float(ctkd.reversal_factor(tf.constant(step, tf.int64), steps_per_epoch, 10.0, 0.0, -1.0))
        assert got == pytest.approx(expected, abs=1e-6), step
    term = ctkd.CurriculumKD(0.9, ctkd.Options(), steps_per_epoch)
    term.build(None)
    t0 = 1 + 20 / (1 + math.exp(-1.0))
    assert float(term.temperature_at(tf.constant(0, tf.int64))) == pytest.approx(t0, rel=1e-6)
    t, s = arrays((5, 10), (5, 10), seed=11, scale=3.0)
    pt, ps = softmax(t / t0), softmax(s / t0)
    expected = t0**2 * (pt * (np.log(pt) - np.log(ps))).sum(-1).mean()
    np.testing.assert_allclose(float(ctkd.kd_at(t, s, tf.constant(t0, tf.float32))), expected, rtol=1e-5)


def test_ctkd_reverses_the_temperatures_gradient_by_lambda():
    """The temperature's gradient is lambda times the loss's: at lambda -1 it climbs the loss."""
    t, s = arrays((8, 10), (8, 10), seed=12, scale=3.0)
    term = ctkd.CurriculumKD(0.9, ctkd.Options(), steps_per_epoch=1)
    term.build(None)
    g = term.parameter.value
    grads = {}
    for step in (0, 4, 20):  # epochs 1, 5, 21: lambda about -0.02, -0.65, -1
        with tf.GradientTape() as tape:
            loss = ctkd.kd_at(t, s, term.temperature_at(tf.constant(step, tf.int64)))
        grads[step] = float(tape.gradient(loss, g))
    with tf.GradientTape() as tape:  # the same loss without the reversal
        plain = ctkd.kd_at(t, s, 1.0 + 20.0 * tf.sigmoid(g))
    plain_grad = float(tape.gradient(plain, g))
    for step, grad in grads.items():
        factor = float(ctkd.reversal_factor(tf.constant(step, tf.int64), 1, 10.0, 0.0, -1.0))
        assert grad == pytest.approx(factor * plain_grad, rel=1e-5)
    assert grads[20] == pytest.approx(-plain_grad, rel=1e-5)


def test_crd_nce_loss_matches_numpy():
    (scores,) = arrays((6, 9), seed=6)
    scores = np.exp(scores)
    n = 1000
    noise = 8 / n  # K = 8 negatives
    expected = -(np.log(scores[:, 0] / (scores[:, 0] + noise + 1e-7)).sum()
                 + np.log(noise / (scores[:, 1:] + noise + 1e-7)).sum()) / 6
    np.testing.assert_allclose(float(crd.nce_loss(scores, n)), expected, rtol=1e-5)


@pytest.mark.parametrize("replacement", [False, True])
def test_crd_negatives_come_from_other_classes_and_the_positive_is_the_example(replacement):
    labels = np.random.default_rng(0).integers(0, 5, 300)
    term = crd.Contrastive(0.8, 16, 200, 0.07, 0.5, replacement=replacement)
    term.set_labels(labels)
    assert term.distinct is not replacement  # 200 <= 300 minus the largest class
    index = np.arange(0, 300, 7, dtype=np.int32)
    idx = term.sample(tf.constant(labels[index]), tf.constant(index), tf.constant(3)).numpy()
    assert idx.shape == (len(index), 201) and (idx[:, 0] == index).all()
    assert (labels[idx[:, 1:]] != labels[index][:, None]).all() and idx.min() >= 0 and idx.max() < 300
    repeats = [200 - len(np.unique(row)) for row in idx[:, 1:]]
    if replacement:  # 200 draws from about 240 images: repeats in every row
        assert min(repeats) > 0
    else:  # the authors' exact mode: 200 distinct images
        assert max(repeats) == 0
    # uniform over the other classes' images: every other-class image is drawn about equally often
    draws = np.concatenate([term.sample(tf.constant(labels[index]), tf.constant(index), tf.constant(s)).numpy()[:, 1:]
                            for s in range(20)])
    assert len(np.unique(draws)) > 0.95 * 300
    counts = np.bincount(draws.ravel(), minlength=300)
    assert counts.max() < 2 * counts[counts > 0].mean()


def test_crd_draws_with_replacement_when_a_class_lacks_k_others():
    term = crd.Contrastive(0.8, 16, 32, 0.07, 0.5)
    term.set_labels(np.arange(40) % 2)  # 20 images of the other class, K 32: the authors' replace=True
    assert not term.distinct
    idx = term.sample(tf.constant([0, 1]), tf.constant([0, 1]), tf.constant(0)).numpy()
    assert ((np.arange(40) % 2)[idx[:, 1:]] != np.array([0, 1])[:, None]).all()


def _sdd_regions_numpy(fmap, kernel, bias, scales):
    """The authors' SPP and head: the map's 4x4 adaptive pool, each scale pooled from that 4x4
    grid, flattened row-major, concatenated in the order of the scales ([1x1, 2x2, 4x4]), each
    region through the dense head; M = [1]: the model's own logits (their KD fallback)."""
    if list(scales) == [1]:
        regions = fmap.mean((1, 2))[:, None]
    else:
        grid = _adaptive_pool_numpy(fmap, 4)
        regions = np.concatenate([_adaptive_pool_numpy(grid, s).reshape(len(fmap), s * s, -1) for s in scales], 1)
    return regions @ kernel + bias  # (B, N, classes)


def _sdd_numpy(t_regions, s_regions, y, tau, inconsistent=2.0, loss="kd", alpha=1.0, beta=8.0):
    """sdd_kd_loss / multi_dkd: per region and example T^2 KL (or DKD), weight 2 where the teacher's
    region and global (first region) predictions are one right and one wrong, sum / (N B)."""
    b, n, k = s_regions.shape
    t, s = t_regions.reshape(-1, k), s_regions.reshape(-1, k)
    labels = np.repeat(y, n)
    if loss == "kd":
        per = tau**2 * kl(softmax(t / tau), softmax(s / tau))
    else:
        gt = np.eye(k)[labels].astype(bool)
        ps, pt = softmax(s / tau), softmax(t / tau)
        bs = np.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], 1)
        bt = np.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], 1)
        pt2, ps2 = softmax(t / tau - 1000.0 * gt), softmax(s / tau - 1000.0 * gt)
        nckd = np.sum(pt2 * (np.log(pt2 + 1e-30) - np.log(ps2 + 1e-30)), -1)
        per = tau**2 * (alpha * kl(bt, bs) + beta * nckd)
    local_right = (t_regions.argmax(-1) == y[:, None])
    global_right = np.repeat(local_right[:, :1], n, 1)
    weight = np.ones((b, n))
    weight[global_right & ~local_right] = inconsistent  # global true, local wrong
    weight[~global_right & local_right] = inconsistent  # global wrong, local true
    return (weight * per.reshape(b, n)).sum() / (n * b), weight


def _map_model(size, channels, classes, seed, name):
    """A model whose input is its last feature map: ReLU, then the zoo's head (pool, dense logits)."""
    keras.utils.set_random_seed(seed)
    maps = keras.Input((size, size, channels), name="maps")
    fmap = keras.layers.ReLU(name="last_relu")(maps)
    dense = keras.layers.Dense(classes, name="logits")
    logits = dense(keras.layers.GlobalAveragePooling2D(name="pool")(fmap))
    dense.bias.assign(np.random.default_rng(seed).normal(size=classes).astype(np.float32))
    return keras.Model(maps, {"logits": logits, "features": [fmap], "preact": [maps]}, name=name)


def _sdd_case(t_size, s_size, batch, scales=(1, 2, 4), loss="kd", tau=4.0, classes=5, seed=0):
    from tfkd.distill.terms import BuildContext, StepInputs

    teacher = _map_model(t_size, 6, classes, seed + 1, "teacher")
    student = _map_model(s_size, 4, classes, seed + 2, "student")
    xt, xs = arrays((batch, t_size, t_size, 6), (batch, s_size, s_size, 4), seed=seed + 3, scale=2.0)
    heads = [m.get_layer("logits").get_weights() for m in (teacher, student)]
    t_regions = _sdd_regions_numpy(np.maximum(xt, 0), *heads[0], scales)
    s_regions = _sdd_regions_numpy(np.maximum(xs, 0), *heads[1], scales)
    glob = t_regions[:, 0].argmax(-1)  # every other example: the teacher's global prediction right
    y = np.where(np.arange(batch) % 2 == 0, glob, (glob + 1) % classes).astype(np.int32)
    expected, weight = _sdd_numpy(t_regions, s_regions, y, tau, 2.0, loss)
    term = sdd.SDD(0.9, tau, scales, 2.0, loss)
    term.build(BuildContext(student, {"teacher": teacher}))
    value = term.compute(StepInputs(y, student(xs), {"teacher": teacher(xt)}))
    return float(value), expected, weight


@pytest.mark.parametrize("size", [8, 4, 7, 6])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_sdd_matches_the_authors_formula_at_any_map_size(size, batch):
    """CIFAR ResNets' and WRNs' 8x8 maps, VGG's 4x4, and 7x7 and 6x6, where the 4x4 bins overlap
    and the 2x2 and 1x1 regions average the 4x4 grid (the authors' SPP), not the map."""
    got, expected, weight = _sdd_case(size, size, batch)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    if batch > 1:  # the global prediction right for some examples, wrong for others: both weights
        assert (weight == 2.0).any() and (weight == 1.0).any()


@pytest.mark.parametrize("t_size, s_size, batch, scales, loss", [
    (8, 4, 3, (1, 2), "kd"), (7, 8, 8, (1, 2, 4), "dkd"), (6, 6, 3, (1, 2), "dkd"), (7, 6, 3, (1,), "kd"),
    (2, 3, 5, (1, 2, 4), "kd")])
def test_sdd_scales_dkd_and_unequal_maps_match_the_authors_formula(t_size, s_size, batch, scales, loss):
    """M = [1, 2] (5 regions) and [1] (plain KD on the logits), SDD-DKD, a teacher and a student with
    maps of different sizes (resnet -> vgg), and maps smaller than the 4x4 grid."""
    got, expected, _ = _sdd_case(t_size, s_size, batch, scales, loss, tau=4.0 if loss == "kd" else 2.0, seed=5)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_sdd_reads_each_models_own_classifier_and_refuses_a_head_it_cannot_find():
    """The zoo's heads: the global region of an 8x8 map (its 4x4 grid's mean) is the model's logits;
    a head that flattens the map is refused when the distiller is built, naming the model."""
    from tfkd.distill.terms import BuildContext, StepInputs

    x, = arrays((4, 32, 32, 3), seed=13)
    cfg = config.load(dotlist=["distill.method=sdd"])
    for name, index in (("resnet8", 2), ("wrn_16_2", 2), ("vgg8", 4), ("mobilenetv2", 3)):
        model = models.get(name, 10)
        found, chain = sdd.classifier_of(model)
        assert found == index == len(model.output["features"]) - 1 and [l.name for l in chain] == ["logits"]
        out = model(x, training=False)
        matrix = sdd.region_matrix(*out["features"][found].shape[1:3], [1, 2, 4])
        regions = np.asarray(sdd.region_logits(out, found, chain, matrix))
        assert regions.shape == (4, 21, 10)
        if out["features"][found].shape[1] % 4 == 0:
            np.testing.assert_allclose(regions[:, 0], np.asarray(out["logits"]), rtol=1e-4, atol=1e-4)
    term = [t for t in resolve("sdd").terms(cfg.distill, RunInfo()) if t.name == "sdd"][0]
    student, teacher = models.get("resnet8", 10), models.get("resnet14", 10)
    term.build(BuildContext(student, {"teacher": teacher}))
    value = term.compute(StepInputs(np.arange(4) % 10, student(x), {"teacher": teacher(x)}))
    assert np.isfinite(float(value))
    maps = keras.Input((8, 8, 4))
    flat = keras.Model(maps, {"logits": keras.layers.Dense(10, name="logits")(keras.layers.Flatten()(maps)),
                              "features": [maps]}, name="flat_head")
    with pytest.raises(ModelError, match=r"flat_head.*'flatten(_\d+)?' \(Flatten\)") as error:
        from_config(cfg.distill, models.get("resnet8", 10), [flat])
    assert "\n" not in str(error.value)


def test_sdd_defaults_are_the_authors():
    """SDD-KD: 0.1 CE + 0.9 SDD, T 4, M [1, 2, 4], weight 2, no warm-up; SDD-DKD: CE + SDD-DKD
    (alpha 1, beta 8) warmed up over 20 epochs; [1, 2] and DKD's beta per pair in the recipe."""
    kd_terms = terms_of("sdd")
    term = kd_terms["sdd"]
    assert (kd_terms["ce"].weight, term.weight, term.temperature, term.scales) == (0.1, 0.9, 4.0, [1, 2, 4])
    assert (term.inconsistent_weight, term.logit_loss, term.warmup_epochs) == (2.0, "kd", 0.0)
    dkd_terms = terms_of("sdd", "distill.sdd.logit_loss=dkd")
    term = dkd_terms["sdd"]
    found = (dkd_terms["ce"].weight, term.weight, term.warmup_epochs, term.alpha, term.beta)
    assert found == (1.0, 1.0, 20.0, 1.0, 8.0)
    assert float(term.weight_at(tf.constant(0))) == pytest.approx(1 / 20)
    mine = terms_of("sdd", "distill.sdd.logit_loss=dkd", "distill.sdd.ce_weight=0.5", "distill.sdd.scales=[1,2]")
    assert mine["ce"].weight == 0.5 and mine["sdd"].scales == [1, 2]
    for teacher, student, scales, beta in (
            ("resnet32x4", "resnet8x4", [1, 2], 8.0), ("vgg13", "vgg8", [1, 2], 6.0),
            ("resnet56", "resnet20", [1, 2, 4], 2.0), ("wrn_40_2", "wrn_16_2", [1, 2, 4], 6.0)):
        cfg = config.load(dotlist=["recipe=mdistiller-cifar100", f"teacher.model={teacher}",
                                   f"student.model={student}", "distill.method=sdd"])
        assert (list(cfg.distill.sdd.scales), cfg.distill.sdd.beta) == (scales, beta), teacher
    with pytest.raises(ConfigError, match="distill.sdd.scales"):
        config.load(dotlist=["distill.method=sdd", "distill.sdd.scales=[2,4]"])


# ----------------------------------------------------------------------------- composition, options
def terms_of(method, *settings):
    cfg = config.load(dotlist=[f"distill.method={method}", *settings])
    return {t.name: t for t in resolve(method).terms(cfg.distill, RunInfo(steps_per_epoch=5))}


def test_compositions_put_a_term_in_the_slot_it_replaces():
    cft_dkd = terms_of("cft+dkd")
    assert list(cft_dkd) == ["ce", "dkd", "feat", "adv"] and cft_dkd["dkd"].teacher == "reconstruction"
    assert terms_of("mktn+dkd")["dkd"].teacher == "classifier"  # the replaced KD term's teacher
    dkd_ls = terms_of("dkd+ls")["dkd"]
    assert (dkd_ls.alpha, dkd_ls.beta, dkd_ls.temperature, dkd_ls.standardize) == (9.0, 72.0, 2.0, True)
    assert terms_of("dist+ls")["dist"].weight == 2.0  # no author setting: the weight stays
    added = terms_of("cft+crd")
    assert list(added) == ["ce", "kd", "feat", "adv", "crd"] and added["crd"].teacher == "reconstruction"
    assert terms_of("cft", "distill.cft.gamma=0")  # cft without KD has no logit term: dkd is added
    assert list(terms_of("cft+dkd", "distill.cft.gamma=0")) == ["ce", "feat", "adv", "dkd"]
    assert methods.teachers_needed("mktn+dkd") == 2 and methods.teachers_needed("kd+ls") == 1


@pytest.mark.parametrize("method,match", [
    ("ls", "put it after one"), ("kd+kd", "appears twice"), ("student+kd", "takes no teacher"),
    ("kd+magic", "expected one of"), ("fitnet+ls", "no logit term to standardize")])
def test_bad_compositions_are_refused_with_one_line(method, match):
    with pytest.raises(ConfigError, match=match) as error:
        terms_of(method)
    assert "\n" not in str(error.value)


def test_old_flat_keys_map_onto_the_method_namespaces():
    cfg = config.load(dotlist=["distill.method=mktn", "distill.beta=0.3", "distill.kd_alpha=0.5",
                               "distill.discriminator.width=2", "distill.hint_weight=7"])
    assert cfg.distill.mktn.beta == 0.3 and cfg.distill.cft.beta == 0.1  # the method's own section
    assert cfg.distill.kd.alpha == 0.5 and cfg.distill.fitnet.weight == 7.0
    assert cfg.distill.mktn.discriminator.width == 2.0
    assert config.load(dotlist=["distill.method=kd", "distill.temperature=2"]).distill.kd.temperature == 2.0
    with pytest.raises(ConfigError, match="option 'distill.dkd.beta' = -1.0: expected >= 0"):
        config.load(dotlist=["distill.method=dkd", "distill.dkd.beta=-1"])


def test_defaults_are_the_papers_cifar_settings():
    d = config.load().distill
    assert (d.dkd.alpha, d.dkd.beta, d.dkd.temperature, d.dkd.warmup_epochs) == (1.0, 8.0, 4.0, 20)
    assert (d.dist.weight, d.dist.beta, d.dist.gamma, d.dist.temperature) == (2.0, 1.0, 1.0, 4.0)
    assert (d.ls.temperature, d.ls.weight) == (2.0, 9.0)
    assert (d.ofd.weight, d.reviewkd.weight, d.reviewkd.warmup_epochs) == (0.001, 5.0, 20)
    assert (d.crd.weight, d.crd.dim, d.crd.negatives, d.crd.temperature, d.crd.momentum) == (0.8, 128, 16384, 0.07, 0.5)
    assert d.crd.replacement is False


# ----------------------------------------------------------------------------- Keras parts
NEW = ["dkd", "dist", "kd+ls", "ofd", "reviewkd", "crd", "nkd", "wttm", "ctkd", "sdd", "mlkd"]


def make(method, sync_bn=False, seed=0, labels=64):
    keras.utils.set_random_seed(seed)
    cfg = config.load(dotlist=[f"distill.method={method}", "distill.crd.negatives=32",
                               "distill.dkd.warmup_epochs=3", "distill.reviewkd.warmup_epochs=3"])
    teachers = [models.get("resnet14", 10, sync_bn=sync_bn) for _ in resolve(method).teachers]
    distiller = from_config(cfg.distill, models.get("resnet8", 10, sync_bn=sync_bn), teachers,
                            steps_per_epoch=2, train_labels=np.arange(labels) % 10, sync_bn=sync_bn)
    distiller.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True))
    distiller.build_all()
    return distiller


def inputs(distiller, x, index):
    if not (distiller.needs_index or distiller.needs_strong_view):
        return x
    named = {"images": x}
    if distiller.needs_index:
        named["index"] = index
    if distiller.needs_strong_view:  # a view of its own: upside down, brighter
        named["strong"] = x[:, ::-1] + 0.5
    return named


@pytest.mark.parametrize("method", NEW)
def test_new_methods_give_the_same_losses_on_two_replicas_as_on_one_device(method, two_replicas):
    x, = arrays((16, 32, 32, 3), seed=7)
    y = (np.arange(16) % 10).astype(np.int32)
    index = np.arange(16, dtype=np.int32) * 3
    weights = make(method, sync_bn=True).get_weights()
    logs = {}
    for name, strategy in (("one", tf.distribute.OneDeviceStrategy("/cpu:0")), ("two", two_replicas)):
        with strategy.scope():
            distiller = make(method, sync_bn=True)
            distiller.set_weights(weights)
        ds = tf.data.Dataset.from_tensor_slices((inputs(distiller, x, index), y)).batch(16)
        logs[name] = distiller.fit(ds, epochs=2, verbose=0, shuffle=False).history
        if method == "crd":
            memory = next(layer for layer in distiller.term_layers if layer.name == "crd_memory")
            logs[name]["bank"] = [memory.memory_s.numpy(), memory.z.numpy()]
    for key in logs["one"]:
        if key == "bank":
            for a, b in zip(logs["one"]["bank"], logs["two"]["bank"]):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
            continue
        np.testing.assert_allclose(logs["two"][key], logs["one"][key], rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("method", NEW)
def test_a_restored_backup_holds_every_terms_state(method, tmp_path):
    from tfkd.callbacks import AtomicBackupAndRestore

    x, = arrays((32, 32, 32, 3), seed=8)
    y = (np.arange(32) % 10).astype(np.int32)
    first = make(method, seed=1)
    ds = tf.data.Dataset.from_tensor_slices((inputs(first, x, np.arange(32, dtype=np.int32)), y)).batch(16)
    backup = str(tmp_path / "backup")
    first.fit(ds, epochs=2, verbose=0, callbacks=[AtomicBackupAndRestore(backup, delete_checkpoint=False)])
    again = make(method, seed=2)  # other initial weights: everything must come from the backup
    again.fit(ds, epochs=2, verbose=0, callbacks=[AtomicBackupAndRestore(backup, delete_checkpoint=False)])
    assert int(again.optimizer.iterations) == int(first.optimizer.iterations) == 4  # warm-up position
    for a, b in zip(first.weights, again.weights):  # student, adapters, embeddings, memory bank, Z
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    step = again.optimizer.iterations
    assert [float(t.weight_at(step)) for t in again.terms] == [float(t.weight_at(step)) for t in first.terms]
    if method == "crd":
        memory = next(layer for layer in again.term_layers if layer.name == "crd_memory")
        assert float(memory.z.numpy()[0]) > 0  # set on the first step, restored


@pytest.mark.xdist_group("methods-crd-kill")  # long, needs no module fixture: its own unit
def test_crd_run_killed_mid_training_resumes_with_its_memory_bank(tmp_path):
    import h5py

    run = tmp_path / "crd"
    args = [sys.executable, "-m", "tfkd.train", "--stage", "distill", "--method", "crd", "--teacher-model",
            "resnet8", "--student-model", "resnet8", "--run-dir", str(run), "--epochs", "4", "--batch-size", "64",
            "--set", "progress=0", "--set", "distill.crd.negatives=256"]
    teacher = tmp_path / "teacher"
    assert subprocess.run([*args[:3], "--stage", "teacher", "--teacher-model", "resnet8", "--run-dir", str(teacher),
                           "--epochs", "1", "--batch-size", "64", "--set", "progress=0"],
                          capture_output=True, timeout=300).returncode == 0
    args += ["--teacher", str(teacher / "teacher.keras")]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metadata = run / "backup" / "distill" / "training_metadata.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(metadata.read_text())["epoch"] >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    backed_up = json.loads(metadata.read_text())["epoch"]
    size = json.loads((run / "dataset.json").read_text())["num_train"]
    banks = []
    with h5py.File(run / "backup" / "distill" / "latest.weights.h5") as f:
        f.visititems(lambda name, obj: banks.append(obj[()]) if getattr(obj, "shape", ()) == (size, 128) else None)
    assert len(banks) == 2 and all(np.isfinite(b).all() for b in banks)  # the student's and the teacher's
    norms = np.linalg.norm(banks[0], axis=1)  # rows the updates reached are unit vectors, the others
    assert np.mean(np.abs(norms - 1) < 1e-4) > 0.9  # (a few: the dropped partial batches) still random
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-1500:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 4 and metrics["epochs_run_here"] == 4 - backed_up
    assert math.isfinite(metrics["test_accuracy"]) and metrics["terms"] == {"ce": 1.0, "crd": 0.8}


@pytest.mark.xdist_group("methods-cli")  # long, needs no module fixture: its own unit
def test_the_newest_logit_methods_run_through_the_cli(tmp_path):
    from tfkd import train

    fast = ["--teacher-model", "resnet8", "--student-model", "resnet8", "--epochs", "1", "--batch-size", "64",
            "--set", "progress=0"]
    assert train.main(["--stage", "teacher", "--run-dir", str(tmp_path / "t"), *fast]) == 0
    expected = {"mlkd": {"ce_views", "mlkd_kd", "mlkd_cc", "mlkd_bc"}}  # its training data has a strong view
    for method in ("nkd", "wttm", "ctkd", "sdd", "mlkd"):
        run_dir = tmp_path / method
        assert train.main(["--stage", "distill", "--method", method, "--teacher", str(tmp_path / "t"),
                           "--run-dir", str(run_dir), *fast]) == 0
        metrics = json.loads((run_dir / "metrics.json").read_text())["stages"]["distill"]
        assert metrics["method"] == method and set(metrics["terms"]) == expected.get(method, {"ce", method})
        assert math.isfinite(metrics["test_accuracy"])


def test_ofds_teacher_normalizes_by_the_batch_as_its_authors_ran_it():
    """mdistiller's OFD keeps the teacher in training mode: its features come from each batch's
    statistics, so the teacher's moving averages do not change the loss (they do with ``moving``),
    and none of its weights is trained."""
    x, = arrays((16, 32, 32, 3), seed=3)
    y = (np.arange(16) % 10).astype(np.int32)
    found = {}
    for mode in ("batch", "moving"):
        for shifted in (False, True):
            keras.utils.set_random_seed(0)
            cfg = config.load(dotlist=["distill.method=ofd", f"distill.ofd.teacher_bn={mode}"])
            teacher = models.get("resnet14", 10)
            if shifted:  # moving averages far from any batch's statistics
                for layer in teacher._flatten_layers():
                    if isinstance(layer, keras.layers.BatchNormalization):
                        layer.moving_mean.assign(layer.moving_mean + 3.0)
                        layer.moving_variance.assign(layer.moving_variance * 25.0)
            distiller = from_config(cfg.distill, models.get("resnet8", 10), [teacher], steps_per_epoch=1)
            distiller.compile(optimizer=keras.optimizers.SGD(0.0))
            distiller.build_all()
            frozen = [w.numpy().copy() for w in teacher.weights if "moving" not in w.path]
            assert distiller.teacher_training == {"teacher": mode == "batch"}
            logs = distiller.train_on_batch(x, y, return_dict=True)
            found[mode, shifted] = logs["ofd"]
            assert all(np.array_equal(a, w.numpy()) for a, w in
                       zip(frozen, [w for w in teacher.weights if "moving" not in w.path]))
            assert not {id(v) for v in teacher.weights} & {id(v) for v in distiller.student_variables}
    assert found["batch", False] == pytest.approx(found["batch", True], rel=1e-5)
    assert abs(found["moving", True] - found["moving", False]) > 0.1 * found["moving", False]
