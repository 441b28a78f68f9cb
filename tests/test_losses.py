import numpy as np
import tensorflow as tf

from tfkd import losses


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, size=6)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected = -log_softmax[np.arange(6), labels].mean()
    np.testing.assert_allclose(float(losses.cross_entropy(labels, logits)), expected, rtol=1e-5)


def test_mean_squared_error_matches_numpy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 4, 4, 3)).astype(np.float32), rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(float(losses.mean_squared_error(a, b)), ((a - b) ** 2).mean(), rtol=1e-5)


def test_psnr_matches_numpy_and_clips_prediction():
    rng = np.random.default_rng(2)
    target = rng.uniform(0, 255, size=(3, 8, 8, 3)).astype(np.float32)
    prediction = target + rng.normal(0, 10, size=target.shape).astype(np.float32)
    clipped = np.clip(prediction, 0, 255)
    mse = ((target - clipped) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(losses.psnr(target, prediction).numpy(), 10 * np.log10(255**2 / mse),
                               rtol=1e-5)
    assert float(losses.psnr(target[:1], target[:1])[0]) > 100  # identical images


def test_scale_for_replicas_divides_by_replica_count(two_replicas):
    strategy = two_replicas
    result = strategy.run(lambda: losses.scale_for_replicas(tf.constant(3.0)))
    values = strategy.experimental_local_results(result)
    assert [float(v) for v in values] == [1.5, 1.5]
    assert float(losses.scale_for_replicas(tf.constant(3.0))) == 3.0
