import keras
import numpy as np
import pytest
import tensorflow as tf

from tfkd import models
from tfkd.teacher import ReconstructionTeacher, build_decoder

MEAN, STD = [120.0, 115.0, 100.0], [60.0, 61.0, 62.0]


def make_teacher(lambda_cls=1.0, lambda_rec=1.0, sync_bn=False, seed=0, name="resnet8"):
    keras.utils.set_random_seed(seed)
    return ReconstructionTeacher(models.get(name, 10, sync_bn=sync_bn), lambda_cls=lambda_cls,
                                 lambda_rec=lambda_rec, pixel_mean=MEAN, pixel_std=STD)


def batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, n).astype(np.int32)


def test_decoder_upsamples_last_stage_to_image():
    decoder = build_decoder((8, 8, 64), (32, 32, 3))
    assert [l.name for l in decoder.layers if isinstance(l, keras.layers.UpSampling2D)] == ["up1", "up2"]
    assert tuple(decoder(np.zeros((1, 8, 8, 64), np.float32)).shape) == (1, 32, 32, 3)
    odd = build_decoder((6, 6, 64), (32, 32, 3))  # not a power of 2: 3 doublings to 48, resized to 32
    assert [l.name for l in odd.layers if isinstance(l, keras.layers.UpSampling2D)] == ["up1", "up2", "up3"]
    assert tuple(odd(np.zeros((1, 6, 6, 64), np.float32)).shape) == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="smaller"):
        build_decoder((64, 64, 8), (32, 32, 3))


def test_teacher_loss_matches_numpy_reference():
    teacher = make_teacher(lambda_cls=0.7, lambda_rec=2.5)
    x, y = batch()
    out = teacher(x, training=False)
    terms = teacher.compute_losses(x, y, out)
    logits = out["logits"].numpy().astype(np.float64)
    log_softmax = logits - logits.max(1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(1, keepdims=True))
    ce = -log_softmax[np.arange(len(y)), y].mean()
    mse = ((x - out["reconstruction"].numpy()) ** 2).mean()
    np.testing.assert_allclose(float(terms["ce"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(terms["rec"]), mse, rtol=1e-5)
    np.testing.assert_allclose(float(terms["loss"]), 0.7 * ce + 2.5 * mse, rtol=1e-5)


def test_train_steps_lower_the_loss():
    teacher = make_teacher()
    teacher.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    x, y = batch(32)
    before = teacher.evaluate(x, y, verbose=0, return_dict=True)
    teacher.fit(x, y, batch_size=32, epochs=15, verbose=0)
    after = teacher.evaluate(x, y, verbose=0, return_dict=True)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["ce"] < before["ce"] and after["rec"] < before["rec"]
    assert after["psnr"] > before["psnr"]


@pytest.mark.parametrize("lambda_cls,lambda_rec,frozen", [(0.0, 1.0, "logits"), (1.0, 0.0, "decoder")])
def test_zero_weight_leaves_that_head_untouched(lambda_cls, lambda_rec, frozen):
    """lambda_cls=0 is an autoencoder (the classifier head never moves); lambda_rec=0 a plain
    classifier (the decoder never moves): MKTN's two teachers are this one class."""
    teacher = make_teacher(lambda_cls, lambda_rec)
    teacher.compile(optimizer=keras.optimizers.SGD(0.1))
    x, y = batch()
    teacher(x)
    part = teacher.backbone.get_layer("logits") if frozen == "logits" else teacher.decoder
    start = [w.numpy().copy() for w in part.trainable_weights]
    encoder_start = teacher.backbone.get_layer("stem_conv").kernel.numpy().copy()
    teacher.fit(x, y, batch_size=16, epochs=2, verbose=0)
    for before, after in zip(start, part.trainable_weights):
        np.testing.assert_array_equal(before, after.numpy())
    assert not np.allclose(encoder_start, teacher.backbone.get_layer("stem_conv").kernel.numpy())


def test_keras_round_trip_gives_identical_outputs(tmp_path):
    teacher = make_teacher(lambda_cls=0.5, lambda_rec=2.0)
    teacher.compile(optimizer=keras.optimizers.SGD(0.05))
    x, y = batch()
    teacher.fit(x, y, batch_size=16, epochs=1, verbose=0)
    teacher.save(tmp_path / "t.keras")
    loaded = keras.saving.load_model(tmp_path / "t.keras", safe_mode=True)
    assert isinstance(loaded, ReconstructionTeacher)
    assert (loaded.lambda_cls, loaded.lambda_rec, loaded.pixel_mean) == (0.5, 2.0, MEAN)
    a, b = teacher(x, training=False), loaded(x, training=False)
    np.testing.assert_array_equal(a["logits"].numpy(), b["logits"].numpy())
    np.testing.assert_array_equal(a["reconstruction"].numpy(), b["reconstruction"].numpy())


def _compiled_teacher():
    teacher = make_teacher(sync_bn=True)
    teacher.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    teacher(np.zeros((2, 32, 32, 3), np.float32))
    return teacher


def test_mirrored_two_replicas_equal_one_device(two_replicas, one_step):
    """Same global batch, same starting weights: 2 replicas step exactly like 1 device."""
    x, y = batch(16, seed=3)
    reference = make_teacher(sync_bn=True)
    reference(x[:2])
    weights = reference.get_weights()
    one_logs, one_weights = one_step(tf.distribute.OneDeviceStrategy("/cpu:0"), _compiled_teacher, weights, x, y)
    two_logs, two_weights = one_step(two_replicas, _compiled_teacher, weights, x, y)
    for key in ("loss", "ce", "rec", "accuracy", "psnr"):
        np.testing.assert_allclose(two_logs[key][0], one_logs[key][0], rtol=1e-5, atol=1e-5, err_msg=key)
    moved = [np.abs(a - w).max() for a, w in zip(one_weights, weights)]
    assert max(moved) > 1e-3, "the step must change weights"
    for a, b in zip(one_weights, two_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
