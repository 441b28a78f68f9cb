"""What every prepared dataset offers the rest of tfkd, whichever pipeline feeds it.

``Data`` is the contract: class names, the normalization, the geometry (``transforms.Geometry``),
split sizes and labels, ``tf.data`` pipelines for training and evaluation, and uint8 pixel
batches of a split as a device would see them (export verification, int8 calibration). The
in-memory pipeline (``tfkd.data.memory``) and the streaming one (``tfkd.data.streaming``)
implement it; nothing outside this package needs to know which one it has.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import tensorflow as tf

from tfkd.data.transforms import Geometry
from tfkd.errors import DataError

SPLITS = ("train", "val", "test")


class Data:
    """A prepared dataset (see the module docstring). Subclasses set the attributes below and
    implement ``labels``, ``train_dataset``, ``_eval_pixels`` and ``pixel_batches``."""

    name: str
    class_names: list[str]
    mean: np.ndarray
    std: np.ndarray
    geometry: Geometry
    pipeline: str = "memory"
    skipped_files: int = 0

    # ------------------------------------------------------------------ description
    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of every model input."""
        return (self.geometry.size, self.geometry.size, 3)

    @property
    def hflip(self) -> bool:
        """Whether training flips images horizontally."""
        return self.geometry.hflip

    def labels(self, split: str) -> np.ndarray:
        """The int32 labels of 'train', 'val' or 'test', in ``eval_dataset``'s order."""
        raise NotImplementedError

    def count(self, split: str) -> int:
        """How many images ``split`` has."""
        return int(len(self.labels(split)))

    @property
    def train_labels(self) -> np.ndarray:
        """The training split's labels (memory banks size themselves on them)."""
        return self.labels("train")

    @property
    def val_labels(self) -> np.ndarray:
        """The validation split's labels."""
        return self.labels("val")

    @property
    def test_labels(self) -> np.ndarray:
        """The test split's labels."""
        return self.labels("test")

    def info(self) -> dict[str, Any]:
        """What a run directory records about its data (normalization constants included)."""
        return {"dataset": self.name, "class_names": self.class_names,
                "image_shape": list(self.image_shape), "mean": self.mean.tolist(),
                "std": self.std.tolist(), "num_train": self.count("train"),
                "num_val": self.count("val"), "num_test": self.count("test"),
                "pipeline": self.pipeline, "preprocessing": self.geometry.record(),
                "skipped_files": int(self.skipped_files)}

    # ------------------------------------------------------------------ pipelines
    def normalize(self, images: Any) -> tf.Tensor:
        """uint8 (or float [0, 255]) pixels -> float32 standardized with the training mean/std."""
        return (tf.cast(images, tf.float32) - self.mean) / self.std

    def steps_per_epoch(self, batch_size: int) -> int:
        """Training steps of one epoch (the partial last batch is dropped)."""
        return self.count("train") // batch_size

    def _check_batch(self, batch_size: int) -> None:
        n = self.count("train")
        if n < batch_size:
            raise DataError(f"{self.name}: the training split has {n} images, fewer than one "
                            f"batch of {batch_size}")

    @staticmethod
    def _options(dataset: tf.data.Dataset) -> tf.data.Dataset:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        return dataset.with_options(options)

    def _finish(self, ds: tf.data.Dataset, with_index: bool, with_strong: bool = False) -> tf.data.Dataset:
        """(uint8 images, labels, index[, strong view]) batches -> normalized model inputs,
        prefetched: ``{"images", "index", "strong"}`` as asked, else the images alone."""
        normalize = self.normalize

        def inputs(x: Any, y: Any, i: Any, *strong: Any) -> Any:
            if not (with_index or with_strong):
                return normalize(x), y
            named = {"images": normalize(x)}
            if with_index:
                named["index"] = i
            if with_strong:
                named["strong"] = normalize(strong[0])
            return named, y

        ds = ds.map(inputs, num_parallel_calls=tf.data.AUTOTUNE)
        return self._options(ds.prefetch(tf.data.AUTOTUNE))

    def _augment_batches(self, ds: tf.data.Dataset, seed: int, with_strong: bool = False) -> tf.data.Dataset:
        """The small-image recipe on (uint8 images, labels, index) batches: pad-and-crop and flips,
        each batch with its own stateless seed. ``with_strong``: a second view is appended, its
        own pad-and-crop and flips then ``transforms.strong_batch`` (seeds folded from the same
        batch seed: the first view is the one a run without it sees)."""
        from tfkd.data.transforms import augment_batch, strong_batch

        seeds, hflip = tf.data.Dataset.random(seed=seed).batch(2), self.geometry.hflip

        def augment(batch: Any, s: Any) -> Any:
            weak = augment_batch(batch[0], s, hflip)
            if not with_strong:
                return weak, batch[1], batch[2]
            fold = tf.random.experimental.stateless_fold_in
            strong = strong_batch(augment_batch(batch[0], fold(s, 1), hflip), fold(s, 2))
            return weak, batch[1], batch[2], strong

        return tf.data.Dataset.zip((ds, seeds)).map(augment, num_parallel_calls=tf.data.AUTOTUNE)

    @staticmethod
    def _per_image(ds: tf.data.Dataset, seed: int, crop: Any, with_strong: bool = False,
                   load: Any = None) -> tf.data.Dataset:
        """``crop(image or encoded bytes, seed)`` on each (item, label, index) element, each
        with its own stateless seed (random-resized crops); ``load`` first reads the item (once).
        ``with_strong``: a second crop of the same item is appended (its seed folded from the
        first's), for ``_strong_batches`` after batching."""
        seeds = tf.data.Dataset.random(seed=seed).batch(2)

        def one(e: Any, s: Any) -> Any:
            item = load(e[0]) if load is not None else e[0]
            if not with_strong:
                return crop(item, s), e[1], e[2]
            return crop(item, s), e[1], e[2], crop(item, tf.random.experimental.stateless_fold_in(s, 1))

        return tf.data.Dataset.zip((ds, seeds)).map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    @staticmethod
    def _strong_batches(ds: tf.data.Dataset, seed: int, copy: bool = False) -> tf.data.Dataset:
        """``transforms.strong_batch`` on the last element of each (images, labels, index,
        view) batch, or with ``copy`` on a copy of the images appended as that view (no crop of
        its own: augmentation off), each batch with its own seed."""
        from tfkd.data.transforms import strong_batch

        seeds = tf.data.Dataset.random(seed=seed).batch(2)
        fold = tf.random.experimental.stateless_fold_in

        def strong(batch: Any, s: Any) -> Any:
            view = batch[0] if copy else batch[3]
            return batch[0], batch[1], batch[2], strong_batch(view, fold(s, 2))

        return tf.data.Dataset.zip((ds, seeds)).map(strong, num_parallel_calls=tf.data.AUTOTUNE)

    def train_dataset(self, batch_size: int, seed: int = 0, augment: bool = True,
                      shuffle_buffer: int = 0, with_index: bool = False,
                      with_strong: bool = False) -> tf.data.Dataset:
        """Shuffled, augmented, normalized training batches (partial last batch dropped).
        ``with_index``: the inputs are ``{"images", "index"}``, the index of each example in
        the training split (for terms with a memory bank). ``with_strong``: they also hold
        ``"strong"``, a second view of each image (its own crop and flip, then RandAugment and
        Cutout: ``transforms.strong_batch``; ``data.strong_view``)."""
        raise NotImplementedError

    def _eval_pixels(self, split: str, batch_size: int) -> tf.data.Dataset:
        """(uint8 model-input images, labels) batches of ``split``, in order."""
        raise NotImplementedError

    def eval_dataset(self, split: str, batch_size: int) -> tf.data.Dataset:
        """Normalized batches of ``split`` ('train', 'val' or 'test'), in order, not augmented."""
        ds = self._eval_pixels(split, batch_size)
        ds = ds.map(lambda x, y: (self.normalize(x), y), num_parallel_calls=tf.data.AUTOTUNE)
        return self._options(ds.prefetch(tf.data.AUTOTUNE))

    def pixel_batches(self, split: str, batch_size: int = 256, limit: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """uint8 model-input pixels and labels of ``split`` in order (the first ``limit``
        images when ``limit`` > 0), as NumPy batches: what a device is given."""
        taken = 0
        for images, labels in self._eval_pixels(split, batch_size).prefetch(2):
            images, labels = images.numpy(), labels.numpy()
            if limit:
                images, labels = images[:limit - taken], labels[:limit - taken]
            taken += len(labels)
            yield images, labels
            if limit and taken >= limit:
                return

    def pixels(self, split: str, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``pixel_batches`` gathered into one array (mind the memory: use ``limit``)."""
        batches = list(self.pixel_batches(split, 256, limit))
        if not batches:
            return np.zeros((0, *self.image_shape), np.uint8), np.zeros((0,), np.int32)
        return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])

    def sample(self, split: str, n: int, seed: int = 0) -> np.ndarray:
        """``n`` model-input images of ``split`` drawn with ``seed`` (calibration, plots)."""
        raise NotImplementedError

    def spread(self, split: str, n: int) -> np.ndarray:
        """``n`` model-input images evenly spread over ``split`` (the same for every run)."""
        raise NotImplementedError
