"""The streaming pipeline: images read and decoded batch by batch, never all in memory.

For datasets larger than memory (a folder of 10^4-10^6 images, a TensorFlow Datasets dataset):
a list of files (or TFDS records with the image left encoded) is shuffled, read and decoded in
parallel (``tf.data.AUTOTUNE``), cropped with the run's geometry (``transforms``: a JPEG decodes
only its crop window), batched, normalized and prefetched. The normalization is estimated from a
seeded sample of training images. Memory stays at a few batches plus the shuffle buffer.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf

from tfkd.data import transforms
from tfkd.data.base import Data
from tfkd.data.transforms import Geometry

#: Shuffle buffer of a stream whose elements are whole encoded images (TFDS records).
RECORD_SHUFFLE = 10_000


class Records:
    """A streamable source: per split, ``(encoded image or path, label, index)`` elements in a
    fixed order; ``is_path`` when elements are file paths (read after the shuffle)."""

    is_path = True

    def count(self, split: str) -> int:
        """How many images ``split`` has (0 when there is no such split)."""
        raise NotImplementedError

    def labels(self, split: str) -> np.ndarray:
        """The int32 labels of ``split``, in ``elements``' order."""
        raise NotImplementedError

    def elements(self, split: str) -> tf.data.Dataset:
        """``(encoded image or path, label, index)`` of ``split`` in a fixed order."""
        raise NotImplementedError

    def indices(self, split: str, chosen: np.ndarray) -> tf.data.Dataset:
        """``elements`` restricted to ``chosen`` positions (a sample), in that order."""
        raise NotImplementedError


class FileRecords(Records):
    """Files of a folder dataset: paths and labels per split (``sources.FileList`` after the
    validation split is carved)."""

    def __init__(self, paths: dict[str, list[str]], labels: dict[str, np.ndarray]) -> None:
        self.paths, self._labels = paths, labels

    def count(self, split: str) -> int:
        return len(self.paths.get(split, []))

    def labels(self, split: str) -> np.ndarray:
        return self._labels.get(split, np.zeros((0,), np.int32))

    def elements(self, split: str) -> tf.data.Dataset:
        n = self.count(split)
        return tf.data.Dataset.from_tensor_slices((tf.constant(self.paths.get(split, []), tf.string),
                                                   tf.constant(self.labels(split), tf.int32),
                                                   tf.range(n, dtype=tf.int32)))

    def indices(self, split: str, chosen: np.ndarray) -> tf.data.Dataset:
        paths = [self.paths[split][i] for i in chosen]
        return tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string),
                                                   tf.constant(self.labels(split)[chosen], tf.int32),
                                                   tf.constant(chosen, tf.int32)))


class StreamData(Data):
    """A dataset read from ``records`` batch by batch (see the module docstring)."""

    pipeline = "streaming"

    def __init__(self, name: str, records: Records, class_names: list[str], geometry: Geometry,
                 mean: Optional[np.ndarray] = None, std: Optional[np.ndarray] = None,
                 stats_images: int = 2000, seed: int = 0, skipped_files: int = 0) -> None:
        self.name, self.records, self.class_names = name, records, list(class_names)
        self.geometry, self.skipped_files = geometry, skipped_files
        if mean is None or std is None:
            mean, std = self.estimate_statistics(stats_images, seed)
        self.mean, self.std = mean, std

    def labels(self, split: str) -> np.ndarray:
        return self.records.labels(split)

    def count(self, split: str) -> int:
        return self.records.count(split)

    # ------------------------------------------------------------------ decoding
    def _read(self) -> Callable[[Any], Any]:
        return tf.io.read_file if self.records.is_path else (lambda contents: contents)

    def _eval_map(self) -> Callable[..., Any]:
        read, geometry = self._read(), self.geometry
        return lambda item, label, index: (transforms.eval_bytes(read(item), geometry), label, index)

    # ------------------------------------------------------------------ statistics
    def estimate_statistics(self, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean/std of up to ``limit`` training images drawn with ``seed`` (their
        evaluation crops), on the [0, 255] scale."""
        n = self.count("train")
        chosen = np.sort(np.random.default_rng(seed).permutation(n)[:min(limit, n)])
        ds = self.records.indices("train", chosen).map(self._eval_map(), num_parallel_calls=tf.data.AUTOTUNE)

        def moments(images: Any, labels: Any, index: Any) -> Any:  # per batch: three numbers a channel
            x = tf.reshape(tf.cast(images, tf.float64), [-1, 3])
            return tf.reduce_sum(x, 0), tf.reduce_sum(x * x, 0), tf.cast(tf.shape(x)[0], tf.float64)

        sums = np.zeros(3, np.float64)
        squares = np.zeros(3, np.float64)
        pixels = 0.0
        for total, total_sq, count in ds.batch(32).map(moments).prefetch(2):
            sums += total.numpy()
            squares += total_sq.numpy()
            pixels += float(count)
        mean = sums / max(pixels, 1)
        std = np.sqrt(np.maximum(squares / max(pixels, 1) - mean ** 2, 0.0))
        return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)

    # ------------------------------------------------------------------ pipelines
    def train_dataset(self, batch_size: int, seed: int = 0, augment: bool = True,
                      shuffle_buffer: int = 0, with_index: bool = False,
                      with_strong: bool = False) -> tf.data.Dataset:
        self._check_batch(batch_size)
        n, geometry, read = self.count("train"), self.geometry, self._read()
        buffer = shuffle_buffer or (n if self.records.is_path else min(n, RECORD_SHUFFLE))
        ds = self.records.elements("train").shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
        if augment and not geometry.small:  # a strong view crops the same bytes, read once
            ds = self._per_image(ds, seed, lambda contents, s: transforms.train_bytes(contents, s, geometry),
                                 with_strong, load=read)
        else:
            ds = ds.map(self._eval_map(), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(batch_size, drop_remainder=True)
        if augment and geometry.small:
            ds = self._augment_batches(ds, seed, with_strong)
        elif with_strong:
            ds = self._strong_batches(ds, seed, copy=not augment)
        return self._finish(ds, with_index, with_strong)

    def _eval_pixels(self, split: str, batch_size: int) -> tf.data.Dataset:
        ds = self.records.elements(split).map(self._eval_map(), num_parallel_calls=tf.data.AUTOTUNE,
                                              deterministic=True)
        return ds.map(lambda x, y, i: (x, y)).batch(batch_size)

    def _images_at(self, split: str, chosen: np.ndarray) -> np.ndarray:
        if not len(chosen):
            return np.zeros((0, *self.image_shape), np.uint8)
        ds = self.records.indices(split, np.asarray(chosen)).map(self._eval_map(),
                                                                 num_parallel_calls=tf.data.AUTOTUNE)
        return np.concatenate([x.numpy() for x, _, _ in ds.batch(256)])

    def sample(self, split: str, n: int, seed: int = 0) -> np.ndarray:
        chosen = np.random.default_rng(seed).permutation(self.count(split))[:n]
        return self._images_at(split, chosen)

    def spread(self, split: str, n: int) -> np.ndarray:
        return self._images_at(split, np.linspace(0, self.count(split) - 1, n).astype(int))
