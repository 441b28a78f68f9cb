"""The in-memory pipeline: decoded uint8 arrays, the fastest cache there is for small datasets.

Small images (CIFAR, digits, any run at 64 px or less) are held at the model's size and
augmented per batch, vectorized (``transforms.augment_batch``). Larger runs hold each image once
(an array source at its own size, a decoded folder as the centred square of its shorter side at
``size / crop_fraction``) and crop per image: random-resized crops for training, the centre crop
for evaluation (``transforms``). Keras ``fit`` distributes the pipeline over the active
``tf.distribute`` strategy; the DATA sharding policy is the right one for in-memory data under
MultiWorkerMirroredStrategy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from tfkd.data import transforms
from tfkd.data.base import Data
from tfkd.data.transforms import Geometry


class ArrayData(Data):
    """Train/validation/test uint8 arrays of one dataset, with its normalization and pipelines.

    The arrays are as stored (``stored_geometry``): the model's input for the small recipe, the
    image each crop is taken from otherwise.
    """

    pipeline = "memory"

    def __init__(self, name: str, train_images: np.ndarray, train_labels: np.ndarray,
                 val_images: np.ndarray, val_labels: np.ndarray, test_images: np.ndarray,
                 test_labels: np.ndarray, class_names: list[str], mean: np.ndarray, std: np.ndarray,
                 geometry: Geometry, skipped_files: int = 0) -> None:
        self.name, self.class_names, self.geometry = name, list(class_names), geometry
        self.train_images, self.val_images, self.test_images = train_images, val_images, test_images
        self._labels = {"train": train_labels, "val": val_labels, "test": test_labels}
        self.mean, self.std = mean, std
        self.skipped_files = skipped_files

    def labels(self, split: str) -> np.ndarray:
        return self._labels[split]

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The stored uint8 images and labels of 'train', 'val' or 'test'."""
        images = {"train": self.train_images, "val": self.val_images, "test": self.test_images}[split]
        return images, self._labels[split]

    @property
    def direct(self) -> bool:
        """True when the stored images are the model's inputs (no per-image crop)."""
        return self.geometry.small and self.train_images.shape[1:3] == (self.geometry.size,) * 2

    def train_dataset(self, batch_size: int, seed: int = 0, augment: bool = True,
                      shuffle_buffer: int = 0, with_index: bool = False,
                      with_strong: bool = False) -> tf.data.Dataset:
        self._check_batch(batch_size)
        n = self.count("train")
        ds = tf.data.Dataset.from_tensor_slices((self.train_images, self.train_labels,
                                                 tf.range(n, dtype=tf.int32)))
        ds = ds.shuffle(shuffle_buffer or n, seed=seed, reshuffle_each_iteration=True)
        geometry = self.geometry
        if geometry.small:
            if not self.direct:  # stored at another size: resize each image, then the batch recipe
                ds = ds.map(lambda x, y, i: (transforms.resize(x, geometry.size), y, i),
                            num_parallel_calls=tf.data.AUTOTUNE)
            ds = ds.batch(batch_size, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)
            if augment:
                ds = self._augment_batches(ds, seed, with_strong)
            elif with_strong:
                ds = self._strong_batches(ds, seed, copy=True)
        else:
            if augment:
                ds = self._per_image(ds, seed, lambda x, s: transforms.train_array(x, s, geometry), with_strong)
            else:
                ds = ds.map(lambda x, y, i: (transforms.eval_array(x, geometry), y, i),
                            num_parallel_calls=tf.data.AUTOTUNE)
            ds = ds.batch(batch_size, drop_remainder=True)
            if with_strong:
                ds = self._strong_batches(ds, seed, copy=not augment)
        return self._finish(ds, with_index, with_strong)

    def _eval_pixels(self, split: str, batch_size: int) -> tf.data.Dataset:
        images, labels = self.arrays(split)
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        if self.direct:
            return ds.batch(batch_size)
        geometry = self.geometry
        return ds.map(lambda x, y: (transforms.eval_array(x, geometry), y),
                      num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)

    def _inputs(self, images: np.ndarray) -> np.ndarray:
        if self.direct or not len(images):
            return images
        return np.stack([transforms.eval_array(tf.constant(x), self.geometry).numpy() for x in images])

    def sample(self, split: str, n: int, seed: int = 0) -> np.ndarray:
        images, _ = self.arrays(split)
        rng = np.random.default_rng(seed)
        return self._inputs(images[rng.permutation(len(images))[:n]])

    def spread(self, split: str, n: int) -> np.ndarray:
        images, _ = self.arrays(split)
        return self._inputs(images[np.linspace(0, len(images) - 1, n).astype(int)])


def stored_geometry_size(geometry: Geometry) -> int:
    """The side a decoded folder image is stored at: the model's for the small recipe, else
    the square the centre crop and the random crops are taken from."""
    return geometry.size if geometry.small else int(round(geometry.size / geometry.crop_fraction))


def store_bytes(contents: Any, geometry: Geometry) -> Any:
    """Encoded image -> uint8 as the in-memory pipeline stores it (``stored_geometry_size``):
    stretched to the model's size (small recipe), else the centred square of its shorter side."""
    image = transforms.decode(contents)
    if not geometry.small:
        shape = tf.shape(image)
        shorter = tf.minimum(shape[0], shape[1])
        image = tf.slice(image, [(shape[0] - shorter) // 2, (shape[1] - shorter) // 2, 0], [shorter, shorter, 3])
    return transforms.resize(image, stored_geometry_size(geometry))


def decode_records(records: Any, split: str, geometry: Geometry, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Every image of ``split`` of ``records`` (``tfkd.data.streaming.Records``) decoded and
    stored (``store_bytes``), with its labels, in the records' order; with progress."""
    from tqdm import tqdm

    n = records.count(split)
    side = stored_geometry_size(geometry)
    if not n:
        return np.zeros((0, side, side, 3), np.uint8), np.zeros((0,), np.int32)
    read = tf.io.read_file if records.is_path else (lambda contents: contents)
    ds = records.elements(split).map(lambda item, label, index: (store_bytes(read(item), geometry), label),
                                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    images = np.empty((n, side, side, 3), np.uint8)
    labels = np.empty((n,), np.int32)
    done = 0
    with tqdm(total=n, desc=f"decoding {what} {split}", unit="img", disable=n < 500) as bar:
        for x, y in ds.batch(256).prefetch(2):
            images[done:done + len(y)], labels[done:done + len(y)] = x.numpy(), y.numpy()
            done += len(y)
            bar.update(len(y))
    return images[:done], labels[:done]


def statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (floored at 1e-3) of uint8 images, on the [0, 255] scale."""
    channels = images.shape[-1]
    sums, squares, count = np.zeros(channels), np.zeros(channels), 0
    for start in range(0, len(images), 2048):  # in chunks: no float64 copy of the whole set
        pixels = images[start:start + 2048].reshape(-1, channels).astype(np.float64)
        sums += pixels.sum(0)
        squares += np.square(pixels).sum(0)
        count += len(pixels)
    mean = sums / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - mean ** 2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def array_inputs_statistics(images: np.ndarray, geometry: Geometry, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of the model inputs of stored arrays: exact when they are the inputs,
    else over the evaluation crops of up to ``limit`` evenly spread images."""
    if geometry.small and images.shape[1:3] == (geometry.size,) * 2:
        return statistics(images)
    chosen = images[np.linspace(0, len(images) - 1, min(limit, len(images))).astype(int)]
    crops = np.stack([transforms.eval_array(tf.constant(x), geometry).numpy() for x in chosen])
    return statistics(crops)

