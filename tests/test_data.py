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
    from conftest import fake_cifar100

    folder = fake_cifar100(tmp_path / "cifar-100-python")
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


# ------------------------------------------------------------------ larger images, streaming
def _photo(height, width, seed):
    """A smooth image (gradients and a stripe pattern) with a little noise: resizing it twice
    or once gives nearly the same pixels, as with real photographs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.stack([yy * 255 / height, xx * 255 / width, 127 + 90 * np.sin(xx / 9.0 + seed)], -1)
    return np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)


def _photo_folder(root, classes=("cat", "dog", "fox"), per_class=12, split_folders=False):
    """Class folders of JPEG and PNG photos of assorted sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    for split in (("train", "test") if split_folders else ("",)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class if split != "test" else 3):
                height, width = (int(v) for v in rng.integers(90, 260, 2))
                suffix = ".jpg" if i % 2 else ".png"
                Image.fromarray(_photo(height, width, 100 * c + i)).save(folder / f"{i}{suffix}", quality=95)
    return root


def test_streamed_folder_gives_what_the_in_memory_pipeline_gives(tmp_path):
    root = _photo_folder(tmp_path / "photos")
    memory = data.prepare(f"folder:{root}", image_size=96, pipeline="memory")
    stream = data.prepare(f"folder:{root}", image_size=96, pipeline="streaming")
    assert type(memory).__name__ == "ArrayData" and type(stream).__name__ == "StreamData"
    assert memory.class_names == stream.class_names == ["cat", "dog", "fox"]
    # no split folders: a stratified 10% test split, the same for every seed, then validation
    assert [memory.count(s) for s in ("train", "val", "test")] == [28, 4, 4]  # 10% of 36, rounded up
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(memory.labels(split), stream.labels(split))
    assert sorted(np.bincount(stream.labels("test"))) == [1, 1, 2]
    a, labels = memory.pixels("test")
    b, _ = stream.pixels("test")
    assert a.shape == b.shape == (4, 96, 96, 3) and a.dtype == b.dtype == np.uint8
    np.testing.assert_array_equal(a, b)  # one geometry, one resize: the same evaluation inputs
    # exact statistics in memory, estimated from a sample when streamed (all 28 images here)
    np.testing.assert_allclose(stream.mean, memory.mean, atol=1.5)
    np.testing.assert_allclose(stream.std, memory.std, atol=1.5)
    for prepared in (memory, stream):
        x, y = next(iter(prepared.train_dataset(8, seed=0)))
        assert x.shape == (8, 96, 96, 3) and x.dtype == tf.float32 and abs(float(tf.reduce_mean(x))) < 1.0
        first = next(iter(prepared.train_dataset(8, seed=0)))[0].numpy()
        np.testing.assert_array_equal(first, x.numpy())  # seeded
        inputs, _ = next(iter(prepared.train_dataset(8, seed=0, with_index=True)))
        assert set(inputs) == {"images", "index"} and inputs["index"].numpy().max() < prepared.count("train")
    info = stream.info()
    assert info["pipeline"] == "streaming" and info["preprocessing"] == {
        "resize": "center_crop", "size": 96, "crop_fraction": 0.875}


def test_evaluation_and_training_windows():
    from tfkd.data import transforms

    geometry = transforms.Geometry(224, crop_fraction=0.875, scale_min=0.25)
    top, left, height, width = (int(v) for v in transforms.eval_window(300, 400, geometry))
    assert (top, left, height, width) == (19, 69, 262, 262)  # 0.875 x 300 = 262.5 -> 262, centred
    areas, ratios = [], []
    for i in range(200):
        top, left, height, width = (int(v) for v in transforms.train_window(300, 400, tf.constant([i, 7]), geometry))
        assert 0 <= top and top + height <= 300 and 0 <= left and left + width <= 400
        areas.append(height * width / (300 * 400))
        ratios.append(width / height)
    assert min(areas) >= 0.25 - 0.01 and max(areas) <= 1.0 and np.std(areas) > 0.1
    assert min(ratios) >= 0.75 - 0.02 and max(ratios) <= 4 / 3 + 0.02
    small = transforms.Geometry(32)
    assert [int(v) for v in transforms.eval_window(40, 50, small)] == [0, 0, 40, 50]  # stretched whole


def test_a_training_crop_is_the_window_resized_and_a_jpeg_decodes_only_its_window(tmp_path):
    from tfkd.data import transforms

    image = _photo(180, 240, 3)
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(image).save(tmp_path / "a.jpg", quality=100)
    geometry = transforms.Geometry(80, hflip=False)  # above 64 px: random-resized crops
    seed = tf.constant([5, 9], tf.int64)
    window_seed = tf.random.experimental.stateless_split(seed, 2)[0]
    top, left, height, width = (int(v) for v in transforms.train_window(180, 240, window_seed, geometry))
    assert (height, width) != (180, 240)
    expected = transforms.resize(tf.constant(image[top:top + height, left:left + width]), 80).numpy()
    png = transforms.train_bytes(tf.io.read_file(str(tmp_path / "a.png")), seed, geometry).numpy()
    np.testing.assert_array_equal(png, expected)
    jpeg = transforms.train_bytes(tf.io.read_file(str(tmp_path / "a.jpg")), seed, geometry).numpy()
    assert np.abs(jpeg.astype(int) - expected.astype(int)).mean() < 2.0  # JPEG's own loss only


def test_the_header_scan_names_a_bad_file_before_training_or_skips_and_counts(tmp_path):
    root = _photo_folder(tmp_path / "photos", per_class=6, split_folders=True)
    good = (root / "train" / "cat" / "1.jpg").read_bytes()
    (root / "train" / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "train" / "dog" / "notes.png").write_text("not an image")
    (root / "test" / "fox" / "empty.jpg").write_bytes(b"")
    before = sorted(p.name for p in root.rglob("*"))
    with pytest.raises(DataError) as info:
        data.prepare(f"folder:{root}", image_size=96, pipeline="streaming")
    message = str(info.value)
    assert "\n" not in message and "unreadable image" in message and "2 more bad file(s)" in message
    assert "truncated.jpg: unreadable image (truncated" in message and "data.skip_bad_files" in message
    skipped = data.prepare(f"folder:{root}", image_size=96, pipeline="streaming", skip_bad_files=True)
    assert skipped.skipped_files == 3 and skipped.info()["skipped_files"] == 3
    assert skipped.count("train") + skipped.count("val") == 18 and skipped.count("test") == 9
    assert len(list(skipped.pixel_batches("test", 4))) == 3  # every remaining file decodes
    assert sorted(p.name for p in root.rglob("*")) == before  # the user's folder is untouched


def test_auto_pipeline_streams_what_does_not_fit_the_memory_budget(tmp_path, capsys):
    root = _photo_folder(tmp_path / "photos", per_class=10)
    assert type(data.prepare(f"folder:{root}", image_size=96)).__name__ == "ArrayData"
    streamed = data.prepare(f"folder:{root}", image_size=96, in_memory_mb=0)
    assert type(streamed).__name__ == "StreamData"
    assert "over data.in_memory_mb=0: streaming them" in capsys.readouterr().out


def _tiny_tfds(data_dir, name="tiny_photos"):
    """Prepares a small TFDS image-classification dataset in ``data_dir`` (as TFDS writes any)."""
    import tensorflow_datasets as tfds

    class TinyPhotos(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["red", "green", "blue"])}),
                supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(40, 0), "test": self._generate_examples(12, 1)}

        def _generate_examples(self, n, seed):
            rng = np.random.default_rng(seed)
            for i in range(n):
                height, width = (int(v) for v in rng.integers(70, 120, 2))
                yield i, {"image": _photo(height, width, 1000 * seed + i), "label": i % 3}

    TinyPhotos.name = name
    TinyPhotos(data_dir=str(data_dir)).download_and_prepare()


def test_a_tfds_dataset_is_read_offline_from_its_folder(tmp_path):
    _tiny_tfds(tmp_path / "tfds")
    found = {}
    for pipeline in ("memory", "streaming"):
        prepared = data.prepare("tfds:tiny_photos", str(tmp_path / "tfds"), image_size=72, pipeline=pipeline)
        assert prepared.class_names == ["red", "green", "blue"]
        # its own test split; validation: the last 10% of its training split
        assert [prepared.count(s) for s in ("train", "val", "test")] == [36, 4, 12]
        np.testing.assert_array_equal(np.bincount(prepared.labels("test")), [4, 4, 4])
        train_and_val = np.concatenate([prepared.labels("train"), prepared.labels("val")])
        np.testing.assert_array_equal(np.bincount(train_and_val), [14, 13, 13])  # i % 3 of 40
        x, y = next(iter(prepared.train_dataset(6)))
        assert x.shape == (6, 72, 72, 3)
        images, labels = prepared.pixels("test")
        assert images.shape == (12, 72, 72, 3)
        np.testing.assert_array_equal(labels, prepared.labels("test"))
        found[pipeline] = images
    assert np.abs(found["memory"].astype(int) - found["streaming"].astype(int)).mean() < 2.0


def test_a_tfds_dataset_missing_offline_names_what_to_fetch(tmp_path):
    folder = tmp_path / "tfds"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    with pytest.raises(DataError) as info:
        data.prepare("tfds:oxford_flowers102", str(folder), image_size=64)
    message = str(info.value)
    assert "\n" not in message and "not prepared in" in message and "download_and_prepare()" in message
    assert sorted(p.name for p in folder.iterdir()) == ["mine.txt"]  # the failed download left nothing
    with pytest.raises(DataError, match="tfds:no_such_dataset: Dataset no_such_dataset not found"):
        data.prepare("tfds:no_such_dataset", str(folder), image_size=64)


def test_a_folder_dataset_is_what_the_user_sees_in_it(tmp_path):
    """Hidden entries are not data: dot-folders of images (.thumbnails), an empty
    .ipynb_checkpoints, macOS's AppleDouble ._ copies (not images at all) and __MACOSX."""
    root = _photo_folder(tmp_path / "photos", classes=("cat", "dog"), per_class=10)
    (root / ".ipynb_checkpoints").mkdir()
    for folder in (root / ".thumbnails", root / "cat" / ".thumbnails", root / "__MACOSX" / "cat"):
        folder.mkdir(parents=True)
        Image.fromarray(_photo(40, 40, 1)).save(folder / "t.jpg")
    (root / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # what macOS copies leave
    (root / "dog" / "Thumbs.db").write_bytes(b"junk")
    listing = data.sources.list_folder(str(root))
    assert listing.class_names == ["cat", "dog"]
    assert listing.count("train") + listing.count("test") == 20
    assert not [p for split in listing.paths.values() for p in split if "/." in p or "__MACOSX" in p]
    assert any("2 hidden image files left out" in note for note in listing.notes), listing.notes
    prepared = data.prepare(f"folder:{root}", image_size=32, pipeline="streaming")
    assert prepared.class_names == ["cat", "dog"] and prepared.count("train") + prepared.count("val") + prepared.count("test") == 20


def test_a_tfds_dataset_without_images_is_refused_before_any_download(tmp_path):
    from tfkd.errors import DataError

    with pytest.raises(DataError, match=r"tfds:imdb_reviews: has no images \(features: label, text\); tfkd "
                                        "trains image classifiers"):
        from tfkd.data.tfds_source import TfdsRecords

        TfdsRecords("imdb_reviews", str(tmp_path), 0.1, 0)
    assert not any(tmp_path.iterdir())  # nothing fetched or prepared


# --------------------------------------------------------------------- phone photos: EXIF
def _kit():
    import sys
    from pathlib import Path

    folder = str(Path(__file__).resolve().parents[1] / "export")
    sys.path.insert(0, folder)
    try:
        import predict
    finally:
        sys.path.remove(folder)
    return predict


def _upright(seed):
    """An upright 48-wide, 80-tall picture: four coloured quadrants and a white top-left corner."""
    picture = np.zeros((80, 48, 3), np.uint8)
    colours = np.random.default_rng(seed).integers(20, 200, (4, 3))
    picture[:40, :24], picture[:40, 24:], picture[40:, :24], picture[40:, 24:] = colours
    picture[:12, :12] = 255
    return picture


#: EXIF orientation -> the Pillow transpose that stores an upright picture that way.
STORED_AS = {1: None, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _phone_folder(root):
    """train/ and test/ folders of two classes of JPEGs stored sideways (EXIF orientation 6 and
    8, as phones write them), upside down (3) and upright (1); returns the upright pictures by
    file name."""
    upright = {}
    for split in ("train", "test"):
        for c, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for o, turn in STORED_AS.items():
                picture = _upright(len(upright))
                stored = Image.fromarray(picture)
                stored = stored.transpose(turn) if turn is not None else stored
                exif = Image.Exif()
                exif[0x0112] = o
                path = root / split / name / f"o{o}.jpg"
                stored.save(path, quality=95, exif=exif.tobytes())
                upright[str(path)] = picture
    return upright


@pytest.mark.parametrize("size", [32, 72])
def test_exif_orientation_is_honoured_alike_by_both_pipelines_the_export_and_the_kit(tmp_path, size):
    from pathlib import Path

    predict = _kit()
    upright = _phone_folder(tmp_path / "phone")
    kit_upright = {}
    for path, picture in upright.items():  # the same picture as an upright PNG, through the kit
        Image.fromarray(picture).save(tmp_path / "u.png")
        kit_upright[path] = predict.load_image(tmp_path / "u.png", (size, size), data.Geometry(size).record())
    results = {}
    for pipeline in ("streaming", "memory"):  # the same files in the same order (the stream's paths)
        prepared = data.prepare(f"folder:{tmp_path / 'phone'}", image_size=size, pipeline=pipeline,
                                validation_fraction=0)
        results[pipeline] = prepared
        # what the export verifies on (and the test accuracy): pixel_batches of the test split
        checked, _ = prepared.pixels("test")
        # what training sees (without augmentation), de-normalized, in file order
        n = prepared.count("train")
        inputs, _ = next(iter(prepared.train_dataset(n, augment=False, with_index=True)))
        order = np.argsort(inputs["index"].numpy())
        trained = inputs["images"].numpy()[order] * prepared.std + prepared.mean
        for split, pixels in (("test", checked), ("train", trained)):
            files = results["streaming"].records.paths[split]
            kit = np.stack([predict.load_image(Path(p), (size, size), prepared.geometry.record()) for p in files])
            diff = np.abs(pixels.astype(np.float32) - kit)
            assert diff.mean() < 1.0, (pipeline, split, diff.mean())
            for p, got in zip(files, kit):  # upright: as the same picture stored upright
                assert np.abs(got - kit_upright[str(p)]).mean() < 2.0, p
                if size == 32:  # stretched whole: the white corner is top left (72 px crops it off)
                    assert got[:2, :2].min() > 200
    np.testing.assert_array_equal(results["memory"].labels("test"), results["streaming"].labels("test"))


# ------------------------------------------------------------ every format Pillow reads
def _format_cases():
    """(file name, image, save options, expected RGB pixels or None for lossy formats) of
    formats TensorFlow does not decode: training decodes them with Pillow, as the kit does."""
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (6, 10, 3)).astype(np.uint8)
    alpha = rng.integers(0, 256, (6, 10, 1)).astype(np.uint8)
    rgba = np.concatenate([rgb, alpha], -1)
    white = ((rgb.astype(np.uint32) * alpha + 255 * (255 - alpha.astype(np.uint32)) + 127) // 255).astype(np.uint8)
    wide = rng.integers(0, 65536, (6, 10)).astype(np.uint16)
    gif = Image.fromarray(rgb).quantize(8)
    gif_rgb = np.asarray(gif.convert("RGB")).copy()
    gif_rgb[np.asarray(gif) == 0] = 255  # palette entry 0 transparent: white
    return [("lossless.webp", Image.fromarray(rgb), {"lossless": True}, rgb),
            ("alpha.webp", Image.fromarray(rgba, "RGBA"), {"lossless": True}, white),
            ("lossy.webp", Image.fromarray(rgb), {"quality": 80}, None),
            ("plain.tif", Image.fromarray(rgb), {}, rgb),
            ("alpha.tiff", Image.fromarray(rgba, "RGBA"), {"compression": "tiff_lzw"}, white),
            ("gray16.tiff", Image.fromarray(wide), {}, np.repeat((wide >> 8).astype(np.uint8)[..., None], 3, -1)),
            ("plain.bmp", Image.fromarray(rgb), {}, rgb),
            ("transparent.gif", gif, {"transparency": 0}, gif_rgb)]


@pytest.mark.parametrize("name,image,options,expected", _format_cases(), ids=[c[0] for c in _format_cases()])
def test_formats_tensorflow_does_not_decode_are_decoded_by_training_as_by_the_kit(tmp_path, name, image, options,
                                                                                 expected):
    from pathlib import Path

    from tfkd.data import transforms

    predict = _kit()
    path = tmp_path / name
    image.save(path, **options)
    trained = transforms.decode(tf.io.read_file(str(path))).numpy()
    device = predict.load_image(Path(path), (6, 10)).astype(np.uint8)
    np.testing.assert_array_equal(trained, device)
    if expected is not None:
        np.testing.assert_array_equal(trained, expected)


def _mixed_folder(root):
    """Two classes, each with one image of each of 7 formats, a .heic and a .dng no decoder
    here reads (fakes: only their names matter) and a notes.txt."""
    rng = np.random.default_rng(9)
    for split, per in (("train", 1), ("test", 1)):
        for c, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, suffix in enumerate((".png", ".jpg", ".webp", ".tif", ".bmp", ".gif", ".tiff")):
                picture = np.full((40, 56, 3), 60 + 120 * c, np.uint8) + rng.integers(0, 30, (40, 56, 3)).astype(np.uint8)
                Image.fromarray(picture).save(folder / f"{i}{suffix}", **({"quality": 95} if suffix == ".jpg" else {}))
            (folder / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
            (folder / "camera.dng").write_bytes(b"II*\x00 raw")
            (folder / "notes.txt").write_text("not an image")
    return root


def test_a_folder_trains_on_every_readable_format_and_names_the_files_it_leaves_out(tmp_path, capsys):
    from pathlib import Path

    from tfkd.data import sources

    predict = _kit()
    root = _mixed_folder(tmp_path / "mixed")
    heic_readable = ".heic" in sources.readable_suffixes()
    for pipeline in ("streaming", "memory"):
        prepared = data.prepare(f"folder:{root}", image_size=32, pipeline=pipeline, validation_fraction=0)
        per_class = 7 + heic_readable
        assert (prepared.count("train"), prepared.count("test")) == (2 * per_class, 2 * per_class)
        if pipeline == "streaming":
            files = prepared.records.paths["test"]
            assert sorted({Path(p).suffix for p in files}) == [".bmp", ".gif", ".jpg", ".png", ".tif", ".tiff", ".webp"]
        pixels, _ = prepared.pixels("test")
        kit = np.stack([predict.load_image(Path(p), (32, 32), prepared.geometry.record()) for p in files])
        diff = np.abs(pixels.astype(np.float32) - kit)
        assert diff.mean() < 0.6 and diff.max() <= 8, (pipeline, diff.mean(), diff.max())  # JPEG decoders differ
    out = capsys.readouterr().out
    assert f"{root / 'train'}: 2 .dng file(s) left out (camera raw: convert the files to JPEG or PNG)" in out
    if not heic_readable:
        assert (f"{root / 'test'}: 2 .heic file(s) left out (HEIC: this Pillow has no reader for it (a plugin "
                "such as pillow-heif adds one), or convert the files to JPEG or PNG)") in out
    # the kit on one class folder: the same images, and the same files named
    assert sorted(predict.readable_suffixes()) == sorted(sources.readable_suffixes())
    names, images = predict.load_inputs([str(root / "test" / "a")], (32, 32), {"resize": "stretch"})
    assert len(names) == 7 + heic_readable and images.shape == (7 + heic_readable, 32, 32, 3)
    err = capsys.readouterr().err
    assert "predict: note: " in err and "1 .dng file(s) left out (camera raw" in err


def test_a_class_of_only_unreadable_files_is_an_error_that_says_why(tmp_path):
    root = _mixed_folder(tmp_path / "mixed")
    for p in (root / "train" / "b").iterdir():
        if p.suffix not in (".dng", ".txt"):
            p.unlink()
    with pytest.raises(DataError, match=r"train/b: empty class folder \(no .*; 1 \.dng file\(s\) left out: "
                                        r"camera raw: convert the files to JPEG or PNG\)"):
        data.prepare(f"folder:{root}", image_size=32, validation_fraction=0)


# ------------------------------------------------------------------ MLKD's strong view
def _pixels(prepared, x):
    """Normalized inputs back on the [0, 255] scale."""
    return np.asarray(x) * prepared.std + prepared.mean


def test_the_strong_view_is_a_second_augmentation_of_the_same_batch(digits):
    plain = next(iter(digits.train_dataset(64, seed=3)))[0].numpy()
    inputs, labels = next(iter(digits.train_dataset(64, seed=3, with_strong=True)))
    assert set(inputs) == {"images", "strong"} and labels.shape == (64,)
    weak, strong = inputs["images"].numpy(), inputs["strong"].numpy()
    assert weak.shape == strong.shape == (64, 32, 32, 3) and strong.dtype == np.float32
    np.testing.assert_array_equal(weak, plain)  # the weak view is what a run without it sees
    pixels = _pixels(digits, strong)
    assert pixels.min() > -0.01 and pixels.max() < 255.01
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)  # whole levels
    changed = np.abs(pixels - _pixels(digits, weak)).mean(axis=(1, 2, 3))
    assert (changed > 1.0).mean() > 0.9  # each image its own ops and cutout
    gray = np.all(np.abs(pixels - [125, 123, 114]) < 0.01, axis=-1)
    assert gray.any(axis=(1, 2)).all()  # every image has its cutout patch
    again = next(iter(digits.train_dataset(64, seed=3, with_strong=True)))[0]
    np.testing.assert_array_equal(again["strong"].numpy(), strong)  # seeded
    other = next(iter(digits.train_dataset(64, seed=4, with_strong=True)))[0]
    assert not np.array_equal(other["strong"].numpy(), strong)
    both, _ = next(iter(digits.train_dataset(64, seed=3, with_index=True, with_strong=True)))
    assert set(both) == {"images", "index", "strong"}
    np.testing.assert_array_equal(both["strong"].numpy(), strong)
    unaugmented, _ = next(iter(digits.train_dataset(64, seed=3, augment=False, with_strong=True)))
    assert not np.array_equal(unaugmented["strong"].numpy(), unaugmented["images"].numpy())


def test_cutout_paints_one_gray_square_up_to_half_the_side():
    from tfkd.data import transforms

    images = np.zeros((200, 32, 32, 3), np.float32)
    out = transforms.cutout(tf.constant(images), tf.constant([5, 6], tf.int64)).numpy()
    for patch in np.all(out == [125, 123, 114], axis=-1):
        rows, cols = np.nonzero(patch.any(1))[0], np.nonzero(patch.any(0))[0]
        assert len(rows) >= 1 and len(cols) >= 1 and len(rows) <= 17 and len(cols) <= 17
        assert patch[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # one filled rectangle
        assert patch.sum() == len(rows) * len(cols)
    sides = np.all(out == [125, 123, 114], axis=-1).any(1).sum(-1)
    assert sides.max() >= 12 and sides.min() <= 4  # sizes drawn up to half the side


def test_strong_ops_match_pils_on_a_random_image():
    """Each RandAugment op of the strong view against PIL's, the library MLKD's authors use."""
    from PIL import ImageEnhance, ImageOps

    from tfkd.data import transforms

    rng = np.random.default_rng(0)
    image = rng.integers(0, 120, (32, 32, 3)).astype(np.uint8)
    pil = Image.fromarray(image)
    u = 0.8
    ranges = {name: (lo, hi) for name, lo, hi in transforms.STRONG_OPS}

    def value(name):
        lo, hi = ranges[name]
        return lo + (hi - lo) * u

    expected = {
        "auto_contrast": ImageOps.autocontrast(pil), "equalize": ImageOps.equalize(pil), "identity": pil,
        "brightness": ImageEnhance.Brightness(pil).enhance(value("brightness")),
        "color": ImageEnhance.Color(pil).enhance(value("color")),
        "contrast": ImageEnhance.Contrast(pil).enhance(value("contrast")),
        "sharpness": ImageEnhance.Sharpness(pil).enhance(value("sharpness")),
        "posterize": ImageOps.posterize(pil, int(value("posterize"))),
        "solarize": ImageOps.solarize(pil, value("solarize")),
        "rotate": pil.rotate(value("rotate")),
        "shear_x": pil.transform(pil.size, Image.AFFINE, (1, value("shear_x"), 0, 0, 1, 0)),
        "shear_y": pil.transform(pil.size, Image.AFFINE, (1, 0, 0, value("shear_y"), 1, 0)),
        "translate_x": pil.transform(pil.size, Image.AFFINE, (1, 0, value("translate_x") * 32, 0, 1, 0)),
        "translate_y": pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0, 1, value("translate_y") * 32)),
    }
    assert set(expected) == set(ranges)
    for i, (name, _, _) in enumerate(transforms.STRONG_OPS):
        got = transforms._strong_op(tf.constant(image[None], tf.float32), tf.constant([i]),
                                    tf.constant([u])).numpy()[0]
        diff = np.abs(got - np.asarray(expected[name]).astype(np.float32))
        assert diff.max() <= 1.0, name  # blends may round the other way


@pytest.mark.parametrize("pipeline", ["memory", "streaming"])
def test_a_strong_view_of_larger_images_is_its_own_crop(tmp_path, pipeline):
    root = _photo_folder(tmp_path / "photos")
    prepared = data.prepare(f"folder:{root}", image_size=96, pipeline=pipeline)
    plain = next(iter(prepared.train_dataset(8, seed=0)))[0].numpy()
    inputs, _ = next(iter(prepared.train_dataset(8, seed=0, with_strong=True)))
    assert set(inputs) == {"images", "strong"} and inputs["strong"].shape == (8, 96, 96, 3)
    np.testing.assert_array_equal(inputs["images"].numpy(), plain)
    pixels = _pixels(prepared, inputs["strong"].numpy())
    assert pixels.min() > -0.01 and pixels.max() < 255.01
    assert np.all(np.abs(pixels - [125, 123, 114]) < 0.01, axis=-1).any(axis=(1, 2)).all()
    again, _ = next(iter(prepared.train_dataset(8, seed=0, with_strong=True)))
    np.testing.assert_array_equal(again["strong"].numpy(), inputs["strong"].numpy())


# ------------------------------------------- one geometry, one resize: memory, streaming, kit
#: (height, width) of the non-square photos: landscape and portrait, both orientations.
SHAPES = ((120, 200), (160, 90), (200, 120), (90, 160))


def _textured(height, width, seed):
    """Random texture, not flat colour: a coarse random field enlarged (features a few pixels
    wide, as in photographs) plus per-pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 5 + 2, width // 5 + 2, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float64)
    return np.clip(field + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8)


def _textured_folder(root):
    """train/ and test/ class folders of PNG (lossless: TensorFlow and Pillow decode the same
    pixels) and JPEG photos of the ``SHAPES``."""
    for s, split in enumerate(("train", "test")):
        for c, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, (height, width) in enumerate(SHAPES * (2 if split == "train" else 1)):
                image = Image.fromarray(_textured(height, width, 1000 * s + 100 * c + i))
                if i % 4 == 3:
                    image.save(folder / f"{i}.jpg", quality=95)
                else:
                    image.save(folder / f"{i}.png")
    return root


def _old_memory_eval(path, geometry):
    """The evaluation input the in-memory pipeline gave before: the centred square of the shorter
    side resized to size / crop_fraction, then its centre crop resized again."""
    from tfkd.data import transforms

    image = transforms.decode(tf.io.read_file(str(path)))
    height, width = image.shape[:2]
    shorter = min(height, width)
    square = image[(height - shorter) // 2:(height - shorter) // 2 + shorter,
                   (width - shorter) // 2:(width - shorter) // 2 + shorter]
    stored = transforms.resize(square, int(round(geometry.size / geometry.crop_fraction)))
    return transforms.eval_array(stored, geometry).numpy()


def _level_diff(a, b):
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(diff.mean()), float(diff.max())


@pytest.mark.parametrize("size", [72, 96, 128])
def test_geometry_both_pipelines_evaluate_the_kits_pixels_with_one_resize(tmp_path, size, capsys):
    from pathlib import Path

    predict = _kit()
    root = _textured_folder(tmp_path / "photos")
    memory = data.prepare(f"folder:{root}", image_size=size, pipeline="memory", validation_fraction=0.25)
    stream = data.prepare(f"folder:{root}", image_size=size, pipeline="streaming", validation_fraction=0.25)
    record = memory.geometry.record()
    figures = {}
    for split in ("val", "test"):
        a, labels = memory.pixels(split)
        b, _ = stream.pixels(split)
        np.testing.assert_array_equal(labels, stream.labels(split))
        assert a.shape == (stream.count(split), size, size, 3)
        assert _level_diff(a, b)[1] <= 1  # the same function: in fact the same pixels
        files = stream.records.paths[split]
        kit = np.stack([predict.load_image(Path(p), (size, size), record) for p in files])
        png = np.array([p.endswith(".png") for p in files])
        figures[split] = _level_diff(a[png], kit[png])
        mean, top = figures[split]
        assert mean < 0.6 and top <= 20, (split, mean, top)  # rounding; the max at a window edge (Pillow also weighs pixels outside the box)
        if (~png).any():
            assert _level_diff(a[~png], kit[~png])[0] < 2.5  # their JPEG decoders differ too (about 1.9 on this noise)
        if split == "test":  # before: the stored square resized, then its centre crop again
            old = np.stack([_old_memory_eval(p, memory.geometry) for p in files])
            figures["before"] = _level_diff(old[png], kit[png])
            assert figures["before"][0] > 3 * max(mean, 0.1), figures
    with capsys.disabled():
        print(f"\n{size} px vs kit (mean, max levels): val {figures['val']}, test {figures['test']}, "
              f"old in-memory test {figures['before']}")


@pytest.mark.parametrize("size", [72, 128])
def test_geometry_in_memory_training_crops_are_the_streamed_crops(tmp_path, size, capsys):
    """The same seed gives the same images in the same order with the same windows of the
    original in both pipelines: identical when the stored training image is the decoded one
    (its shorter side at most size / crop_fraction: every photo at 128 px), the same window
    resampled from the smaller stored copy otherwise (72 px)."""
    from tfkd.data import memory as memory_module

    root = _textured_folder(tmp_path / "photos")
    memory = data.prepare(f"folder:{root}", image_size=size, pipeline="memory", validation_fraction=0)
    stream = data.prepare(f"folder:{root}", image_size=size, pipeline="streaming", validation_fraction=0)
    stored = memory.train_images
    assert isinstance(stored, memory_module.StoredImages) and len(stored) == stream.count("train") == 16
    cap = memory_module.training_side(memory.geometry)
    for (h, w), (oh, ow) in zip(stored.shapes, stored.original):
        assert min(h, w) == min(cap, oh, ow) and abs(h / w - oh / ow) < 0.02  # aspect kept
    downscaled = bool((stored.shapes != stored.original).any())
    assert downscaled == (size == 72)
    figures = []
    for augment in (True, False):
        pixels = {}
        for name, prepared in (("memory", memory), ("streaming", stream)):
            inputs, labels = next(iter(prepared.train_dataset(16, seed=3, augment=augment, with_index=True)))
            pixels[name] = _pixels(prepared, inputs["images"].numpy())
            pixels[name + " index"] = inputs["index"].numpy()
        np.testing.assert_array_equal(pixels["memory index"], pixels["streaming index"])
        jpeg = np.array([p.endswith(".jpg") for p in stream.records.paths["train"]])[pixels["memory index"]]
        mean, top = _level_diff(pixels["memory"][~jpeg], pixels["streaming"][~jpeg])
        figures.append((augment, round(mean, 3), round(top, 3)))
        if downscaled:  # the window resampled from the copy kept at `cap` px, not from the file
            assert mean < 5.0 and top <= 48, (augment, mean, top)  # its fine noise, smoothed in the copy
        else:
            assert top < 0.01, (augment, mean, top)  # the same crops (normalization rounding only)
    if size == 128:  # the windows are random-resized crops, not the evaluation window
        crops = _pixels(memory, next(iter(memory.train_dataset(16, seed=3)))[0].numpy())
        centre = _pixels(memory, next(iter(memory.train_dataset(16, seed=3, augment=False)))[0].numpy())
        assert _level_diff(crops, centre)[0] > 10
    with capsys.disabled():
        print(f"\n{size} px training, memory vs streaming (augment, mean, max levels): {figures}")


def test_geometry_the_memory_estimate_is_what_memory_holds(tmp_path):
    """The auto pipeline's estimate of the bytes held in memory (a sample of training images'
    shapes: here every one) is what the in-memory pipeline then holds, in both recipes."""
    from tfkd.config import DataConfig
    from tfkd.data import memory as memory_module

    root = _textured_folder(tmp_path / "photos")
    for size in (48, 72, 128):
        cfg = DataConfig(dataset=f"folder:{root}", image_size=size, validation_fraction=0.25, pipeline="memory")
        prepared = data.load(cfg)
        held = sum(prepared.arrays(s)[0].nbytes for s in ("train", "val", "test"))
        records = data._folder_records(cfg, 0)[0]
        estimate, how = memory_module.estimated_bytes(records, prepared.geometry)
        assert estimate == held, (size, estimate, held, how)
        if size > 64:  # training images keep their aspect ratio: more than a square each
            side = memory_module.training_side(prepared.geometry)
            assert prepared.train_images.nbytes > prepared.count("train") * min(side, 90) ** 2 * 3


def test_the_kit_and_training_read_the_same_image_files():
    """The kit (no tfkd import) keeps its own copy of the image-file lists: the copies agree,
    and so does what each says of a file it cannot read."""
    from tfkd.data import sources

    kit = _kit()
    for name in ("IMAGE_SUFFIXES", "OPTIONAL_SUFFIXES", "UNREADABLE_SUFFIXES"):
        assert getattr(kit, name) == getattr(sources, name), name
    assert kit.readable_suffixes() == sources.readable_suffixes()
    suffixes = {*sources.IMAGE_SUFFIXES, *sources.OPTIONAL_SUFFIXES, *sources.UNREADABLE_SUFFIXES, ".txt"}
    assert {s: kit.unreadable_reason(s) for s in suffixes} == {s: sources.unreadable_reason(s) for s in suffixes}
    assert sources.unreadable_reason(".dng") == "camera raw: convert the files to JPEG or PNG"
