import pickle

import numpy as np
import pytest
from conftest import fake_cifar
import tensorflow as tf
from PIL import Image

from tfkd import data
from tfkd.errors import DataError


def test_digits_fixed_stratified_split(digits):
    assert digits.num_classes == 10 and digits.image_shape == (32, 32, 3)
    total = len(digits.train_labels) + len(digits.val_labels) + len(digits.test_labels)
    assert total == 1797 and len(digits.test_labels) == 360
    assert len(digits.val_labels) == 144  # 10% of the 1437 training images
    # stratified: every class is in every split in proportion
    for labels in (digits.train_labels, digits.val_labels, digits.test_labels):
        counts = np.bincount(labels, minlength=10)
        assert counts.min() > 0 and counts.max() - counts.min() <= max(3, 0.05 * len(labels))
    # the test split does not depend on the seed; the validation split does
    other = data.prepare("digits", seed=1)
    np.testing.assert_array_equal(other.test_images, digits.test_images)
    assert not np.array_equal(other.val_images, digits.val_images)
    assert digits.hflip is False  # mirrored digits are other glyphs


def test_normalization_uses_training_split_statistics(digits):
    pixels = digits.train_images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(digits.mean, pixels.mean(0), rtol=1e-5)
    np.testing.assert_allclose(digits.std, pixels.std(0), rtol=1e-5)
    x, _ = next(iter(digits.eval_dataset("val", 1000)))
    expected = (digits.val_images.astype(np.float32) - digits.mean) / digits.std
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_augment_crops_a_window_of_the_reflect_padded_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(16, 32, 32, 3)).astype(np.uint8)
    out = data.augment_batch(tf.constant(images), tf.constant([1, 2], tf.int64), hflip=True).numpy()
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    offsets, flips = set(), 0
    for image, result in zip(padded, out):
        windows = {(dy, dx, f): (image[dy:dy + 32, dx:dx + 32, :][:, ::-1] if f else image[dy:dy + 32, dx:dx + 32])
                   for dy in range(9) for dx in range(9) for f in (0, 1)}
        matches = [k for k, w in windows.items() if np.array_equal(w, result)]
        assert matches, "every output is a (possibly mirrored) 32x32 window of the padded image"
        offsets.add(matches[0][:2])
        flips += matches[0][2]
    assert len(offsets) > 4 and 0 < flips < 16  # random per image, not per batch


def test_train_dataset_batches_shuffles_and_is_seeded(digits):
    ds = digits.train_dataset(64, seed=0)
    batches = list(ds)
    assert len(batches) == len(digits.train_labels) // 64
    assert all(x.shape == (64, 32, 32, 3) and x.dtype == tf.float32 for x, _ in batches)
    first_a = next(iter(digits.train_dataset(64, seed=0)))[0].numpy()
    first_b = next(iter(digits.train_dataset(64, seed=0)))[0].numpy()
    np.testing.assert_array_equal(first_a, first_b)
    with pytest.raises(DataError, match="fewer than one batch"):
        digits.train_dataset(100000)


def _write_images(folder, sizes_modes):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (size, mode, suffix) in enumerate(sizes_modes):
        channels = {"L": None, "RGB": 3, "RGBA": 4}[mode]
        shape = (size, size) if channels is None else (size, size, channels)
        Image.fromarray(rng.integers(0, 255, shape).astype(np.uint8), mode).save(folder / f"img{i}{suffix}")


def test_folder_dataset_mixed_sizes_grayscale_rgba(tmp_path):
    _write_images(tmp_path / "train" / "cats", [(40, "RGB", ".png"), (20, "L", ".png"), (32, "RGBA", ".png")] * 2)
    _write_images(tmp_path / "train" / "dogs", [(64, "RGB", ".jpg"), (32, "RGB", ".jpeg")] * 3)
    _write_images(tmp_path / "test" / "cats", [(50, "RGB", ".png")])
    _write_images(tmp_path / "test" / "dogs", [(16, "L", ".jpg")])
    prepared = data.prepare(f"folder:{tmp_path}", image_size=24, validation_fraction=0.25)
    assert prepared.class_names == ["cats", "dogs"]
    assert prepared.train_images.shape[1:] == (24, 24, 3) and prepared.train_images.dtype == np.uint8
    assert len(prepared.train_labels) + len(prepared.val_labels) == 12
    np.testing.assert_array_equal(prepared.test_labels, [0, 1])


@pytest.mark.parametrize("case,match", [
    ("missing", "image folder not found"),
    ("empty_class", "empty class folder"),
    ("corrupt", "unreadable image"),
    ("no_test", "missing split folder"),
])
def test_folder_dataset_errors_name_the_path(tmp_path, case, match):
    root = tmp_path / "ds"
    if case != "missing":
        _write_images(root / "train" / "a", [(32, "RGB", ".png")])
        (root / "train" / "b").mkdir()
        if case != "empty_class":
            _write_images(root / "train" / "b", [(32, "RGB", ".png")])
        if case == "corrupt":
            (root / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
        if case != "no_test":
            _write_images(root / "test" / "a", [(32, "RGB", ".png")])
    with pytest.raises(DataError, match=match) as info:
        data.load_source(f"folder:{root}")
    assert "\n" not in str(info.value) and str(root) in str(info.value)


def test_cifar_batches_layout_is_channels_last(tmp_path):
    fake_cifar(tmp_path / "c")
    source = data.load_cifar_batches("cifar10", str(tmp_path / "c"))
    raw = pickle.loads((tmp_path / "c" / "data_batch_1").read_bytes())[b"data"]
    np.testing.assert_array_equal(source.train_images[0, :, :, 0].ravel(), raw[0, :1024])  # red plane
    np.testing.assert_array_equal(source.train_images[0, :, :, 2].ravel(), raw[0, 2048:])  # blue plane
    assert source.train_images.shape == (100, 32, 32, 3) and source.class_names[3] == "c3"


@pytest.mark.parametrize("damage,match", [
    ("truncate", "unreadable CIFAR batch file"),
    ("delete", "missing CIFAR batch file"),
    ("labels", "labels must be in 0..9"),
])
def test_cifar_batch_errors(tmp_path, damage, match):
    fake_cifar(tmp_path / "c", labels=[12] * 20 if damage == "labels" else None)
    target = tmp_path / "c" / "data_batch_3"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:1000])
    elif damage == "delete":
        target.unlink()
    with pytest.raises(DataError, match=match) as info:
        data.load_cifar_batches("cifar10", str(tmp_path / "c"))
    assert "data_batch" in str(info.value)


def test_real_cifar10_pipeline(cifar10_dir):
    """The real CIFAR-10 read locally: sizes, class balance, known channel means, batches."""
    prepared = data.prepare("cifar10", str(cifar10_dir), validation_fraction=0.1, seed=0)
    assert prepared.class_names[0] == "airplane" and prepared.class_names[9] == "truck"
    assert (len(prepared.train_labels), len(prepared.val_labels), len(prepared.test_labels)) == (45000, 5000, 10000)
    np.testing.assert_array_equal(np.bincount(prepared.test_labels), [1000] * 10)
    np.testing.assert_array_equal(np.bincount(prepared.val_labels), [500] * 10)
    # CIFAR-10's well-known per-channel training mean and std (0-255 scale)
    np.testing.assert_allclose(prepared.mean, [125.3, 123.0, 113.9], atol=0.5)
    np.testing.assert_allclose(prepared.std, [63.0, 62.1, 66.7], atol=0.5)
    x, y = next(iter(prepared.train_dataset(128)))
    assert x.shape == (128, 32, 32, 3) and abs(float(tf.reduce_mean(x))) < 0.2
    assert prepared.hflip is True


def test_pipeline_feeds_a_distribution_strategy(digits, two_replicas):
    strategy = two_replicas
    dist = strategy.experimental_distribute_dataset(digits.train_dataset(32))
    x, y = next(iter(dist))
    assert [v.shape[0] for v in strategy.experimental_local_results(x)] == [16, 16]


def test_cifar100_python_layout(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 30), ("test", 10)):
        batch = {b"data": rng.integers(0, 255, (n, 3072)).astype(np.uint8),
                 b"fine_labels": list(rng.integers(0, 100, n)), b"coarse_labels": [0] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"c%d" % i for i in range(100)]}))
    prepared = data.prepare("cifar100", str(folder), validation_fraction=0.0)
    assert prepared.num_classes == 100 and len(prepared.train_labels) == 30 and len(prepared.test_labels) == 10
    assert len(prepared.val_labels) == 0


def test_tfds_source_converts_what_tfds_returns(monkeypatch):
    """CIFAR without --data-dir comes from TensorFlow Datasets (no network here: tfds.load is
    replaced by a stand-in returning what it returns with batch_size=-1, as_supervised=True)."""
    import types

    import tensorflow_datasets as tfds

    rng = np.random.default_rng(0)
    split = lambda n: (tf.constant(rng.integers(0, 255, (n, 32, 32, 3)).astype(np.uint8)),  # noqa: E731
                       tf.constant(rng.integers(0, 10, n).astype(np.int64)))
    info = types.SimpleNamespace(features={"label": types.SimpleNamespace(names=[f"c{i}" for i in range(10)])})
    calls = {}

    def fake_load(name, **kwargs):
        calls.update(kwargs, name=name)
        return (split(50), split(20)), info

    monkeypatch.setattr(tfds, "load", fake_load)
    source = data.load_source("cifar10")
    assert calls["name"] == "cifar10" and calls["as_supervised"] and calls["batch_size"] == -1
    assert source.train_images.shape == (50, 32, 32, 3) and source.train_images.dtype == np.uint8
    assert source.test_labels.dtype == np.int32 and source.class_names[3] == "c3"

    def failing_load(name, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds, "load", failing_load)
    with pytest.raises(DataError, match="offline, pass --data-dir"):
        data.load_source("cifar100")
