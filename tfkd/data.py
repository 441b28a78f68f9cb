"""Datasets in, one ``tf.data`` pipeline out.

Sources (``cifar10``, ``cifar100``, ``folder:PATH``, ``digits``) all decode once into memory as
uint8 NHWC arrays at the model's input size; the pipeline then shuffles, augments (reflect-pad 4,
random crop, optional horizontal flip: training only, vectorized per batch), normalizes with the
per-channel mean/std of the training split, batches to the global batch size and prefetches.
Keras ``fit`` distributes it over the active ``tf.distribute`` strategy; the sharding policy is
set to DATA, which is the right one for in-memory data under MultiWorkerMirroredStrategy.

Decoding to memory is deliberate: it makes bad files fail up front with their name, and on the
CIFAR scale (150 MB) it is the fastest cache there is.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import tensorflow as tf

from tfkd.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
CIFAR_FILES = {
    "cifar10": (["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"],
                ["test_batch"], "batches.meta", b"label_names", b"labels"),
    "cifar100": (["train"], ["test"], "meta", b"fine_label_names", b"fine_labels"),
}
PAD = 4


@dataclass
class Source:
    """A dataset as decoded uint8 arrays: images (N, H, W, 3) and int32 labels (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]


# --------------------------------------------------------------------------------- sources
def _read_pickle(path: Path) -> dict:
    """Reads one CIFAR batch file. Only files inside the folder the user named are read."""
    if not path.is_file():
        raise DataError(f"{path}: missing CIFAR batch file")
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as error:  # truncated or not a pickle
        raise DataError(f"{path}: unreadable CIFAR batch file ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else 'truncated'})") from None


def _lookup(mapping: Any, key: bytes) -> Any:
    """``mapping[key]`` under its byte-string or its str spelling (copies of CIFAR differ)."""
    if not isinstance(mapping, dict):
        return None
    return mapping.get(key, mapping.get(key.decode()))


def _cifar_arrays(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_pickle(path)
    data, labels = _lookup(batch, b"data"), _lookup(batch, label_key)
    if data is None or labels is None:
        raise DataError(f"{path}: expected a dict with keys 'data' and {label_key.decode()!r}")
    data, labels = np.asarray(data), np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DataError(f"{path}: b'data' must be uint8 of shape (N, 3072), got "
                        f"{data.dtype} {data.shape}")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(labels)} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels must be in 0..{num_classes - 1}, found "
                        f"{labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int32)


def load_cifar_batches(name: str, data_dir: str) -> Source:
    """Reads the canonical CIFAR python batches (``cifar-10-batches-py``/``cifar-100-python``)."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"{data_dir}: data directory not found")
    train_files, test_files, meta_file, names_key, label_key = CIFAR_FILES[name]
    meta = _read_pickle(folder / meta_file)
    names = _lookup(meta, names_key)
    if names is None:
        raise DataError(f"{folder / meta_file}: missing key {names_key.decode()!r}")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    parts = {}
    for split, files in (("train", train_files), ("test", test_files)):
        arrays = [_cifar_arrays(folder / f, label_key, len(class_names)) for f in files]
        parts[split] = (np.concatenate([a[0] for a in arrays]), np.concatenate([a[1] for a in arrays]))
    return Source(*parts["train"], *parts["test"], class_names)


def load_tfds(name: str) -> Source:
    """Loads CIFAR through TensorFlow Datasets (downloads on first use).

    TFDS retries a failed download ten times with a growing back-off (minutes behind a progress
    bar when there is no network); here a download is tried twice, so an offline machine gets
    the message at once.
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import downloader

    retries = downloader.MAX_RETRIES
    downloader.MAX_RETRIES = 1
    try:
        (train, test), info = tfds.load(name, split=["train", "test"], as_supervised=True,
                                        batch_size=-1, with_info=True)
    except Exception as error:
        raise DataError(f"{name}: TensorFlow Datasets could not provide it "
                        f"({type(error).__name__}); offline, pass --data-dir with the "
                        f"canonical python batches") from None
    finally:
        downloader.MAX_RETRIES = retries
    (xtr, ytr), (xte, yte) = tfds.as_numpy(train), tfds.as_numpy(test)
    return Source(xtr, ytr.astype(np.int32), xte, yte.astype(np.int32),
                  list(info.features["label"].names))


def _decode_image(path: Path, size: int) -> np.ndarray:
    """Decodes any PNG/JPEG/BMP/GIF (grayscale and RGBA included) to uint8 RGB at size x size."""
    try:
        image = tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
        raise DataError(f"{path}: unreadable image") from None
    if image.shape[0] != size or image.shape[1] != size:
        image = tf.image.resize(image, (size, size), antialias=True)
        image = tf.clip_by_value(tf.round(image), 0, 255)
    return tf.cast(image, tf.uint8).numpy()


def _class_files(folder: Path) -> tuple[list[Path], int]:
    """The image files of one class folder, nested sub-folders included (as Keras's
    ``image_dataset_from_directory`` reads them); also how many of them are nested."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return files, sum(1 for p in files if p.parent != folder)


def load_folder(root: str, size: int) -> Source:
    """Reads ``root/train/<class>/**`` and ``root/test/<class>/**``; classes are train's
    sub-folders (at least two); images in nested folders of a class belong to it (counted in
    a note)."""
    from tqdm import tqdm

    root_path = Path(root)
    if not root_path.is_dir():
        raise DataError(f"{root}: image folder not found")
    class_dirs = sorted(p for p in (root_path / "train").glob("*") if p.is_dir())
    if not (root_path / "train").is_dir() or not class_dirs:
        raise DataError(f"{root_path / 'train'}: expected one sub-folder per class")
    if len(class_dirs) < 2:
        raise DataError(f"{root_path / 'train'}: one class folder ({class_dirs[0].name}); a classifier "
                        "needs at least two")
    class_names = [p.name for p in class_dirs]
    arrays = {}
    for split in ("train", "test"):
        split_dir = root_path / split
        if not split_dir.is_dir():
            raise DataError(f"{split_dir}: missing split folder")
        unknown = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in class_names)
        if unknown:
            raise DataError(f"{split_dir}: class folders {unknown} are not in {root_path / 'train'}")
        files: list[tuple[Path, int]] = []
        nested = 0
        for label, name in enumerate(class_names):
            class_files, class_nested = _class_files(split_dir / name) if (split_dir / name).is_dir() else ([], 0)
            if split == "train" and not class_files:
                raise DataError(f"{split_dir / name}: empty class folder (no {'/'.join(IMAGE_SUFFIXES)} files)")
            files += [(p, label) for p in class_files]
            nested += class_nested
        if not files:
            raise DataError(f"{split_dir}: no images")
        if nested:
            print(f"tfkd: note: {split_dir}: {nested} of {len(files)} images are in nested folders "
                  "of their class folder; they count as that class")
        images = [_decode_image(p, size) for p, _ in tqdm(files, desc=f"decoding {split}", unit="img",
                                                          disable=len(files) < 500)]
        arrays[split] = (np.stack(images), np.array([lab for _, lab in files], np.int32))
    return Source(*arrays["train"], *arrays["test"], class_names)


def load_digits() -> Source:
    """scikit-learn's bundled 8x8 digits, upsampled to 32x32x3; fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    digits = sk_digits()
    images = (digits.images * (255.0 / 16.0)).astype(np.float32)[..., None]
    images = tf.image.resize(images, (32, 32), method="bilinear").numpy()
    images = np.repeat(np.clip(np.round(images), 0, 255).astype(np.uint8), 3, axis=-1)
    labels = digits.target.astype(np.int32)
    xtr, xte, ytr, yte = train_test_split(images, labels, test_size=0.2, stratify=labels,
                                          random_state=0)
    return Source(xtr, ytr, xte, yte, [str(i) for i in range(10)])


def load_source(dataset: str, data_dir: Optional[str] = None, image_size: int = 32) -> Source:
    """Dispatches on the dataset name; see the module docstring."""
    if dataset in CIFAR_FILES:
        return load_cifar_batches(dataset, data_dir) if data_dir else load_tfds(dataset)
    if dataset == "digits":
        return load_digits()
    if dataset.startswith("folder:"):
        return load_folder(dataset[len("folder:"):], image_size)
    raise DataError(f"unknown dataset {dataset!r}: expected cifar10, cifar100, digits or folder:PATH")


# --------------------------------------------------------------------------------- pipeline
def augment_batch(images: tf.Tensor, seed: tf.Tensor, hflip: bool) -> tf.Tensor:
    """Reflect-pads a uint8/float batch by 4, crops a random window of the original size per
    image and, if ``hflip``, mirrors half of the images. ``seed`` is a stateless [2] seed."""
    batch = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [PAD, PAD], [PAD, PAD], [0, 0]], mode="REFLECT")
    seeds = tf.random.experimental.stateless_split(seed, 3)
    offsets = tf.random.stateless_uniform([batch, 2], seeds[0], 0, 2 * PAD + 1, dtype=tf.int32)
    rows = offsets[:, :1] + tf.range(height)[None, :]
    cols = offsets[:, 1:] + tf.range(width)[None, :]
    cropped = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)
    if hflip:
        flip = tf.random.stateless_uniform([batch, 1, 1, 1], seeds[1]) < 0.5
        cropped = tf.where(flip, tf.reverse(cropped, axis=[2]), cropped)
    return cropped


@dataclass
class Data:
    """Train/validation/test arrays of one dataset, with its normalization and pipelines."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    mean: np.ndarray
    std: np.ndarray
    hflip: bool

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of every image."""
        return tuple(int(d) for d in self.train_images.shape[1:])  # type: ignore[return-value]

    def normalize(self, images: Any) -> tf.Tensor:
        """uint8 (or float [0, 255]) pixels -> float32 standardized with the training mean/std."""
        return (tf.cast(images, tf.float32) - self.mean) / self.std

    def _options(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        return dataset.with_options(options)

    def train_dataset(self, batch_size: int, seed: int = 0, augment: bool = True,
                      shuffle_buffer: int = 0, with_index: bool = False) -> tf.data.Dataset:
        """Shuffled, augmented, normalized training batches (partial last batch dropped).
        ``with_index``: the inputs are ``{"images", "index"}``, the index of each example in
        the training split (for terms with a memory bank)."""
        n = len(self.train_labels)
        if n < batch_size:
            raise DataError(f"{self.name}: the training split has {n} images, fewer than one "
                            f"batch of {batch_size}")
        ds = tf.data.Dataset.from_tensor_slices((self.train_images, self.train_labels,
                                                 tf.range(n, dtype=tf.int32)))
        ds = ds.shuffle(shuffle_buffer or n, seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)
        if augment:
            seeds = tf.data.Dataset.random(seed=seed).batch(2)
            ds = tf.data.Dataset.zip((ds, seeds)).map(
                lambda batch, s: (augment_batch(batch[0], s, self.hflip), batch[1], batch[2]),
                num_parallel_calls=tf.data.AUTOTUNE)
        if with_index:
            ds = ds.map(lambda x, y, i: ({"images": self.normalize(x), "index": i}, y),
                        num_parallel_calls=tf.data.AUTOTUNE)
        else:
            ds = ds.map(lambda x, y, i: (self.normalize(x), y), num_parallel_calls=tf.data.AUTOTUNE)
        return self._options(ds.prefetch(tf.data.AUTOTUNE))

    def eval_dataset(self, split: str, batch_size: int) -> tf.data.Dataset:
        """Normalized batches of ``split`` ('val' or 'test'), in order, not augmented."""
        images, labels = self.arrays(split)
        ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
        ds = ds.map(lambda x, y: (self.normalize(x), y), num_parallel_calls=tf.data.AUTOTUNE)
        return self._options(ds.prefetch(tf.data.AUTOTUNE))

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The uint8 images and labels of 'train', 'val' or 'test'."""
        return {"train": (self.train_images, self.train_labels),
                "val": (self.val_images, self.val_labels),
                "test": (self.test_images, self.test_labels)}[split]

    def info(self) -> dict[str, Any]:
        """What a run directory records about its data (normalization constants included)."""
        return {"dataset": self.name, "class_names": self.class_names,
                "image_shape": list(self.image_shape), "mean": self.mean.tolist(),
                "std": self.std.tolist(), "num_train": int(len(self.train_labels)),
                "num_val": int(len(self.val_labels)), "num_test": int(len(self.test_labels))}


def prepare(dataset: str, data_dir: Optional[str] = None, image_size: int = 32,
            validation_fraction: float = 0.1, seed: int = 0,
            hflip: Optional[bool] = None, subset: float = 1.0) -> Data:
    """Loads ``dataset``, carves a stratified seeded validation split from train and computes
    the per-channel normalization on what remains for training. ``subset`` < 1 keeps that
    stratified fraction of the training and test splits (quick trials, notebooks)."""
    from sklearn.model_selection import train_test_split

    source = load_source(dataset, data_dir, image_size)
    xtr, ytr = source.train_images, source.train_labels
    xte, yte = source.test_images, source.test_labels
    classes = len(source.class_names)
    if subset < 1.0:
        for split, labels in (("training", ytr), ("test", yte)):
            if round(subset * len(labels)) < classes:
                raise DataError(f"{dataset}: data.subset={subset} keeps {round(subset * len(labels))} of "
                                f"{len(labels)} {split} images, fewer than its {classes} classes: "
                                f"raise data.subset to at least {classes / len(labels):.3g}")
        xtr, _, ytr, _ = train_test_split(xtr, ytr, train_size=subset, stratify=ytr, random_state=seed)
        xte, _, yte, _ = train_test_split(xte, yte, train_size=subset, stratify=yte, random_state=seed)
    if xtr.shape[1:3] != (image_size, image_size) and not dataset.startswith("folder:"):
        xtr_shape = xtr.shape[1:3]
        raise DataError(f"{dataset}: images are {xtr_shape[0]}x{xtr_shape[1]}, the run expects "
                        f"{image_size}x{image_size} (set data.image_size)")
    xval = np.zeros((0, *xtr.shape[1:]), np.uint8)
    yval = np.zeros((0,), np.int32)
    if validation_fraction > 0:
        held_out = int(np.ceil(validation_fraction * len(ytr)))
        if held_out < 1 or len(ytr) - held_out < 1:
            raise DataError(f"{dataset}: data.validation_fraction={validation_fraction} of {len(ytr)} "
                            "training images leaves an empty training or validation split")
        counts = np.bincount(ytr)
        stratify = ytr if counts[counts > 0].min() >= 2 and held_out >= len(counts[counts > 0]) \
            and len(ytr) - held_out >= len(counts[counts > 0]) else None
        xtr, xval, ytr, yval = train_test_split(xtr, ytr, test_size=validation_fraction,
                                                stratify=stratify, random_state=seed)
    pixels = xtr.reshape(-1, xtr.shape[-1]).astype(np.float64)
    mean = pixels.mean(axis=0).astype(np.float32)
    std = np.maximum(pixels.std(axis=0), 1e-3).astype(np.float32)
    return Data(name=dataset, train_images=xtr, train_labels=ytr, val_images=xval, val_labels=yval,
                test_images=xte, test_labels=yte,
                class_names=source.class_names, mean=mean, std=std,
                hflip=(dataset != "digits") if hflip is None else hflip)
