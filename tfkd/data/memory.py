"""The in-memory pipeline: decoded uint8 arrays, the fastest cache there is for small datasets.

Small images (CIFAR, digits, any run at 64 px or less) are held at the model's size and
augmented per batch, vectorized (``transforms.augment_batch``). Array sources (CIFAR, digits)
at a larger size hold each image as it is and crop per image (``transforms.eval_array``,
``train_array``).

Decoded folders and TFDS sets above 64 px see exactly the streaming pipeline's geometry, with one
resize between the decoded file and the model's input:

- validation and test are held as their evaluation inputs (``size x size``): the evaluation
  window of the decoded, upright original resized once (``transforms.eval_bytes``, what the
  streaming pipeline computes and the ``export/`` kit's Pillow resize of the same box gives on a
  device, within a level);
- training images are held once each, aspect ratio kept (``StoredImages``: one flat buffer, each
  image's stored and original height and width beside it), as decoded when their shorter side is
  at most ``training_side`` (``size / crop_fraction``: the evaluation window then needs no
  upscaling), else resized once so that it is (and a panorama's longer side to at most
  ``LONG_RATIO`` times that). A training crop is the window ``transforms.train_window`` draws on
  the ORIGINAL shape (the streaming pipeline's window for the same seed), found on the stored copy
  and resampled once (``transforms.train_stored``): an image stored as decoded gives the
  streaming pipeline's crop exactly.

Keras ``fit`` distributes the pipeline over the active ``tf.distribute`` strategy; the DATA
sharding policy is the right one for in-memory data under MultiWorkerMirroredStrategy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from tfkd.data import transforms
from tfkd.data.base import Data
from tfkd.data.transforms import Geometry


#: A stored training image's longer side is at most this many times ``training_side``.
LONG_RATIO = 3


def training_side(geometry: Geometry) -> int:
    """The largest shorter side of a stored training image above 64 px: the side whose
    evaluation window (``crop_fraction`` of it) is the model's input size."""
    return int(round(geometry.size / geometry.crop_fraction))


def stored_shape(height: Any, width: Any, geometry: Geometry) -> Any:
    """int32 (height, width) a decoded ``height x width`` training image is stored at above 64 px:
    as it is when its shorter side is at most ``training_side``, else scaled (aspect kept) to
    that shorter side, or to a longer side of ``LONG_RATIO x training_side`` for a panorama."""
    side = float(training_side(geometry))
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    scale = tf.minimum(1.0, tf.minimum(side / tf.minimum(h, w), LONG_RATIO * side / tf.maximum(h, w)))
    return tf.stack([tf.maximum(tf.cast(tf.round(h * scale), tf.int32), 1),
                     tf.maximum(tf.cast(tf.round(w * scale), tf.int32), 1)])


class StoredImages:
    """Training images of a decoded folder or TFDS set above 64 px (see the module docstring):
    ``pixels`` the flat uint8 buffer of all images one after another, ``offsets`` where each
    starts, ``shapes`` each one's stored (height, width), ``original`` its decoded upright
    (height, width), the shape its crop windows are drawn on."""

    def __init__(self, pixels: np.ndarray, offsets: np.ndarray, shapes: np.ndarray, original: np.ndarray) -> None:
        self.pixels, self.offsets = pixels, offsets.astype(np.int64)
        self.shapes, self.original = shapes.astype(np.int32), original.astype(np.int32)
        self._tensor: Any = None

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def nbytes(self) -> int:
        """Bytes the images take (their stored pixels)."""
        return int(self.pixels.nbytes)

    def image(self, i: int) -> np.ndarray:
        """The ``i``-th stored image, (height, width, 3) uint8 (a view)."""
        h, w = (int(v) for v in self.shapes[i])
        return self.pixels[self.offsets[i]:self.offsets[i] + h * w * 3].reshape(h, w, 3)

    def elements(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offsets, stored shapes, original shapes): what a dataset slices, the pixels staying put."""
        return self.offsets, self.shapes, self.original

    def loader(self) -> Any:
        """(offset, stored shape, original shape) -> (stored image, original shape), in a
        ``tf.data`` map; the pixels become one tensor, once, that every pipeline reads."""
        if self._tensor is None:
            self._tensor = tf.constant(self.pixels)
        flat = self._tensor

        def load(element: Any) -> Any:
            offset, shape, original = element
            size = tf.cast(shape[0] * shape[1] * 3, tf.int64)
            image = tf.reshape(tf.slice(flat, tf.reshape(offset, [1]), tf.reshape(size, [1])),
                               tf.stack([shape[0], shape[1], 3]))
            return image, original

        return load

    def eval_inputs(self, chosen: np.ndarray, geometry: Geometry) -> np.ndarray:
        """The evaluation inputs of the ``chosen`` images (``transforms.eval_stored``)."""
        if not len(chosen):
            return np.zeros((0, geometry.size, geometry.size, 3), np.uint8)
        return np.stack([transforms.eval_stored(tf.constant(self.image(i)), tf.constant(self.original[i]),
                                                geometry).numpy() for i in chosen])


class ArrayData(Data):
    """Train/validation/test uint8 images of one dataset, with its normalization and pipelines.

    The images are as stored: the model's inputs for the small recipe; for larger sizes an array
    source's own images (cropped per image), or for a decoded folder or TFDS set
    (``eval_inputs``) validation and test as their evaluation inputs and training as
    ``StoredImages``.
    """

    pipeline = "memory"

    def __init__(self, name: str, train_images: Any, train_labels: np.ndarray,
                 val_images: np.ndarray, val_labels: np.ndarray, test_images: np.ndarray,
                 test_labels: np.ndarray, class_names: list[str], mean: np.ndarray, std: np.ndarray,
                 geometry: Geometry, skipped_files: int = 0, eval_inputs: bool = False) -> None:
        self.name, self.class_names, self.geometry = name, list(class_names), geometry
        self.train_images, self.val_images, self.test_images = train_images, val_images, test_images
        self._labels = {"train": train_labels, "val": val_labels, "test": test_labels}
        self.mean, self.std = mean, std
        self.skipped_files = skipped_files
        self.eval_inputs = eval_inputs

    def labels(self, split: str) -> np.ndarray:
        return self._labels[split]

    def arrays(self, split: str) -> tuple[Any, np.ndarray]:
        """The stored uint8 images (``StoredImages`` for training images of a decoded folder
        above 64 px) and labels of 'train', 'val' or 'test'."""
        images = {"train": self.train_images, "val": self.val_images, "test": self.test_images}[split]
        return images, self._labels[split]

    @property
    def direct(self) -> bool:
        """True when the stored training images are the model's inputs (no per-image crop)."""
        return self.geometry.small and self.train_images.shape[1:3] == (self.geometry.size,) * 2

    def _is_input(self, split: str) -> bool:
        """True when the stored images of ``split`` are its evaluation inputs."""
        images = self.arrays(split)[0]
        if isinstance(images, StoredImages):
            return False
        if self.eval_inputs and split != "train":
            return True
        return self.geometry.small and images.shape[1:3] == (self.geometry.size,) * 2

    def _stored_elements(self) -> tf.data.Dataset:
        """((offset, stored shape, original shape), label, index) of the stored training images."""
        n = self.count("train")
        return tf.data.Dataset.from_tensor_slices((self.train_images.elements(), self.train_labels,
                                                   tf.range(n, dtype=tf.int32)))

    def train_dataset(self, batch_size: int, seed: int = 0, augment: bool = True,
                      shuffle_buffer: int = 0, with_index: bool = False,
                      with_strong: bool = False) -> tf.data.Dataset:
        self._check_batch(batch_size)
        n = self.count("train")
        geometry = self.geometry
        if isinstance(self.train_images, StoredImages):  # a decoded folder above 64 px
            ds = self._stored_elements().shuffle(shuffle_buffer or n, seed=seed, reshuffle_each_iteration=True)
            load = self.train_images.loader()
            if augment:  # the streaming pipeline's windows (same order, same seeds), one resize
                ds = self._per_image(ds, seed, lambda item, s: transforms.train_stored(item[0], item[1], s, geometry),
                                     with_strong, load=load)
            else:
                ds = ds.map(lambda e, y, i: (transforms.eval_stored(*load(e), geometry), y, i),
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            ds = ds.batch(batch_size, drop_remainder=True)
            if with_strong:
                ds = self._strong_batches(ds, seed, copy=not augment)
            return self._finish(ds, with_index, with_strong)
        ds = tf.data.Dataset.from_tensor_slices((self.train_images, self.train_labels,
                                                 tf.range(n, dtype=tf.int32)))
        ds = ds.shuffle(shuffle_buffer or n, seed=seed, reshuffle_each_iteration=True)
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
        geometry = self.geometry
        if isinstance(images, StoredImages):
            load = images.loader()
            ds = tf.data.Dataset.from_tensor_slices((images.elements(), labels))
            return ds.map(lambda e, y: (transforms.eval_stored(*load(e), geometry), y),
                          num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        if self._is_input(split):
            return ds.batch(batch_size)
        return ds.map(lambda x, y: (transforms.eval_array(x, geometry), y),
                      num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)

    def _inputs(self, split: str, chosen: np.ndarray) -> np.ndarray:
        images, _ = self.arrays(split)
        if isinstance(images, StoredImages):
            return images.eval_inputs(chosen, self.geometry)
        images = images[chosen]
        if self._is_input(split) or not len(images):
            return images
        return np.stack([transforms.eval_array(tf.constant(x), self.geometry).numpy() for x in images])

    def sample(self, split: str, n: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return self._inputs(split, rng.permutation(self.count(split))[:n])

    def spread(self, split: str, n: int) -> np.ndarray:
        return self._inputs(split, np.linspace(0, self.count(split) - 1, n).astype(int))


def store_bytes(contents: Any, geometry: Geometry) -> Any:
    """Encoded image -> the uint8 ``size x size`` image the in-memory pipeline holds for
    evaluation: stretched to the model's size (small recipe), else its evaluation input
    (``transforms.eval_bytes``: the evaluation window of the original, resized once)."""
    if geometry.small:
        return transforms.resize(transforms.decode(contents), geometry.size)
    return transforms.eval_bytes(contents, geometry)


def store_training_bytes(contents: Any, geometry: Geometry) -> tuple[Any, Any, Any]:
    """Encoded image -> (flat uint8 pixels, stored (height, width), original (height, width)) as
    ``StoredImages`` holds a training image above 64 px: decoded upright, resized once to
    ``stored_shape`` when that is smaller."""
    image = transforms.decode(contents)
    original = tf.shape(image)[:2]
    stored = stored_shape(original[0], original[1], geometry)
    image = tf.cond(tf.reduce_all(tf.equal(stored, original)), lambda: image,
                    lambda: transforms.resize_to(image, stored[0], stored[1]))
    return tf.reshape(image, [-1]), stored, original


def _reader(records: Any) -> Any:
    return tf.io.read_file if records.is_path else (lambda contents: contents)


def decode_records(records: Any, split: str, geometry: Geometry, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Every image of ``split`` of ``records`` (``tfkd.data.streaming.Records``) decoded to the
    ``size x size`` image held for it (``store_bytes``), with its labels, in the records' order;
    with progress."""
    from tqdm import tqdm

    n = records.count(split)
    side = geometry.size
    if not n:
        return np.zeros((0, side, side, 3), np.uint8), np.zeros((0,), np.int32)
    read = _reader(records)
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


def decode_training(records: Any, geometry: Geometry, what: str) -> tuple[StoredImages, np.ndarray]:
    """The training split of ``records`` decoded into ``StoredImages`` (``store_training_bytes``),
    with its labels, in the records' order; with progress. The images are joined into one buffer
    at the end (for that moment they are held twice)."""
    from tqdm import tqdm

    n = records.count("train")
    read = _reader(records)
    ds = records.elements("train").map(lambda item, label, index: (*store_training_bytes(read(item), geometry), label),
                                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    chunks: list[np.ndarray] = []
    shapes, original, labels = np.zeros((n, 2), np.int32), np.zeros((n, 2), np.int32), np.zeros((n,), np.int32)
    done = 0
    with tqdm(total=n, desc=f"decoding {what} train", unit="img", disable=n < 500) as bar:
        for pixels, stored, shape, label in ds.prefetch(16):
            chunks.append(pixels.numpy())
            shapes[done], original[done], labels[done] = stored.numpy(), shape.numpy(), label.numpy()
            done += 1
            bar.update(1)
    sizes = np.array([len(c) for c in chunks], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if done else np.zeros((0,), np.int64)
    pixels = np.concatenate(chunks) if chunks else np.zeros((0,), np.uint8)
    del chunks
    return StoredImages(pixels, offsets, shapes[:done], original[:done]), labels[:done]


def estimated_bytes(records: Any, geometry: Geometry, sample: int = 64) -> tuple[int, str]:
    """The bytes the in-memory pipeline would hold for ``records``, and how that was found:
    ``size x size x 3`` an image up to 64 px and for validation and test above it; a training
    image above 64 px takes its ``stored_shape``, estimated from the shapes of ``sample`` training
    images spread over the split (a JPEG's from its header, other formats decoded)."""
    per_input = geometry.size * geometry.size * 3
    held_out = records.count("val") + records.count("test")
    n = records.count("train")
    if geometry.small or not n:
        return (n + held_out) * per_input, f"decoded at {geometry.size} px"
    chosen = np.unique(np.linspace(0, n - 1, min(sample, n)).astype(int))
    read = _reader(records)

    def stored_pixels(item: Any, label: Any, index: Any) -> Any:
        shape = transforms.image_shape(read(item))
        stored = stored_shape(shape[0], shape[1], geometry)
        return tf.cast(stored[0], tf.int64) * tf.cast(stored[1], tf.int64)

    pixels = np.array([int(v) for v in records.indices("train", chosen).map(stored_pixels)])
    mean = float(pixels.mean())
    return held_out * per_input + int(round(n * mean * 3)), (
        f"{geometry.size} px evaluation inputs and training images kept at up to {training_side(geometry)} px "
        f"on their shorter side ({mean:,.0f} pixels each on average over {len(chosen)})")


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


def array_inputs_statistics(images: Any, geometry: Geometry, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of the model inputs of stored training images: exact when they are the
    inputs, else over the evaluation inputs of up to ``limit`` evenly spread images."""
    if isinstance(images, StoredImages):
        chosen = np.linspace(0, len(images) - 1, min(limit, len(images))).astype(int)
        return statistics(images.eval_inputs(chosen, geometry))
    if geometry.small and images.shape[1:3] == (geometry.size,) * 2:
        return statistics(images)
    chosen = images[np.linspace(0, len(images) - 1, min(limit, len(images))).astype(int)]
    crops = np.stack([transforms.eval_array(tf.constant(x), geometry).numpy() for x in chosen])
    return statistics(crops)
