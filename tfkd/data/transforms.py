"""The image geometry of every pipeline: how a decoded image becomes the model's input.

Two recipes, chosen by the run's image size (``data.image_size``):

- small images (up to ``SMALL_MAX`` = 64 px, CIFAR's world): the image is resized to
  ``size x size`` whatever its aspect ratio; training pads it by 4 (reflect) and crops a random
  window of the original size, with an optional horizontal flip (``augment_batch``, per batch);
- larger images (the ImageNet recipe): evaluation takes the centred square of side
  ``crop_fraction`` x the shorter side (``eval_window``) and resizes it to ``size x size``
  (0.875: the 224-of-256 crop); training takes a random-resized crop (``train_window``: 8% to
  100% of the area by default, aspect ratio 3/4 to 4/3) and flips half of the images.

Windows are integer pixel boxes of the decoded image, so a JPEG decodes only the window it needs
(``tf.io.decode_and_crop_jpeg``); resizing is bilinear with antialiasing, which is what the
``export/`` kit's Pillow resize of the same box does on a device (``crop_box`` there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tensorflow as tf

#: The largest image side trained with the small-image (pad-and-crop) recipe.
SMALL_MAX = 64
#: Reflect padding of the small-image recipe.
PAD = 4
#: The random-resized crop's aspect-ratio range.
ASPECT_RANGE = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class Geometry:
    """How images reach the model: its input side, the evaluation crop, the training crop."""

    size: int
    crop_fraction: float = 0.875
    scale_min: float = 0.08
    hflip: bool = True

    @property
    def small(self) -> bool:
        """True when the pad-and-crop recipe applies (``size`` <= 64)."""
        return self.size <= SMALL_MAX

    def record(self) -> dict[str, Any]:
        """What a run folder and a model card record, so a device preprocesses the same way."""
        if self.small:
            return {"resize": "stretch", "size": self.size}
        return {"resize": "center_crop", "size": self.size, "crop_fraction": self.crop_fraction}


# ------------------------------------------------------------------------------- windows
def eval_window(height: Any, width: Any, geometry: Geometry) -> tuple[Any, Any, Any, Any]:
    """(top, left, height, width) of the evaluation window in a ``height x width`` image: the
    whole image (small recipe) or the centred square of ``crop_fraction`` x the shorter side."""
    if geometry.small:
        return tf.constant(0), tf.constant(0), tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    shorter = tf.cast(tf.minimum(height, width), tf.float32)
    side = tf.maximum(tf.cast(tf.round(shorter * geometry.crop_fraction), tf.int32), 1)
    return (height - side) // 2, (width - side) // 2, side, side


def train_window(height: Any, width: Any, seed: Any, geometry: Geometry) -> tuple[Any, Any, Any, Any]:
    """(top, left, height, width) of a random-resized crop (``seed``: a stateless [2] seed):
    ``scale_min`` to 100% of the area, aspect ratio in ``ASPECT_RANGE``; after 10 failed draws
    the evaluation window."""
    shape = tf.stack([tf.cast(height, tf.int32), tf.cast(width, tf.int32), tf.constant(3)])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=ASPECT_RANGE, area_range=(geometry.scale_min, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return begin[0], begin[1], size[0], size[1]


# ------------------------------------------------------------------------------ decoding
def is_jpeg(contents: Any) -> Any:
    """True for JPEG bytes (they can be decoded window by window)."""
    return tf.equal(tf.strings.substr(contents, 0, 3), b"\xff\xd8\xff")


def image_shape(contents: Any) -> Any:
    """(height, width) of encoded image bytes: from the JPEG header, else by decoding."""
    return tf.cond(is_jpeg(contents),
                   lambda: tf.image.extract_jpeg_shape(contents)[:2],
                   lambda: tf.shape(decode(contents))[:2])


def decode(contents: Any) -> Any:
    """Any PNG/JPEG/BMP/GIF (grayscale, RGBA, 16-bit) as uint8 RGB; 16-bit keeps its high byte."""
    image = tf.io.decode_image(contents, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image


def _decode_window(contents: Any, window: tuple[Any, Any, Any, Any]) -> Any:
    top, left, height, width = window
    crop = tf.stack([top, left, height, width])
    return tf.cond(is_jpeg(contents),
                   lambda: tf.io.decode_and_crop_jpeg(contents, crop, channels=3),
                   lambda: tf.slice(decode(contents), [top, left, 0], [height, width, 3]))


def resize(image: Any, size: int) -> Any:
    """uint8 ``size x size`` (bilinear, antialiased; unchanged when already that size)."""
    shape = tf.shape(image)
    same = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))

    def scaled() -> Any:
        out = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

    out = tf.cond(same, lambda: tf.cast(image, tf.uint8), scaled)
    out.set_shape([size, size, 3])
    return out


def eval_bytes(contents: Any, geometry: Geometry) -> Any:
    """Encoded image -> uint8 evaluation input (``size x size x 3``)."""
    if geometry.small:
        return resize(decode(contents), geometry.size)
    height_width = image_shape(contents)
    window = eval_window(height_width[0], height_width[1], geometry)
    return resize(_decode_window(contents, window), geometry.size)


def train_bytes(contents: Any, seed: Any, geometry: Geometry) -> Any:
    """Encoded image -> uint8 training input: the evaluation resize for the small recipe (its
    augmentation runs per batch), a random-resized crop (+ flip) for larger images."""
    if geometry.small:
        return resize(decode(contents), geometry.size)
    height_width = image_shape(contents)
    seeds = tf.random.experimental.stateless_split(seed, 2)
    window = train_window(height_width[0], height_width[1], seeds[0], geometry)
    return _flip(resize(_decode_window(contents, window), geometry.size), seeds[1], geometry.hflip)


def eval_array(image: Any, geometry: Geometry) -> Any:
    """A decoded uint8 image -> its evaluation input (the evaluation window, resized)."""
    shape = tf.shape(image)
    top, left, height, width = eval_window(shape[0], shape[1], geometry)
    return resize(tf.slice(image, [top, left, 0], [height, width, 3]), geometry.size)


def train_array(image: Any, seed: Any, geometry: Geometry) -> Any:
    """A decoded uint8 image -> a random-resized crop (+ flip) at ``size`` (larger images)."""
    shape = tf.shape(image)
    seeds = tf.random.experimental.stateless_split(seed, 2)
    top, left, height, width = train_window(shape[0], shape[1], seeds[0], geometry)
    crop = tf.slice(image, [top, left, 0], [height, width, 3])
    return _flip(resize(crop, geometry.size), seeds[1], geometry.hflip)


def _flip(image: Any, seed: Any, hflip: bool) -> Any:
    if not hflip:
        return image
    return tf.cond(tf.random.stateless_uniform([], seed) < 0.5, lambda: tf.reverse(image, [1]), lambda: image)


# --------------------------------------------------------------------- small-image recipe
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


# --------------------------------------------------------------------------- strong view
#: RandAugment's operations and magnitude ranges, in the order of MLKD's authors' list (their
#: ``augment_list``, FixMatch's variant): each op of an image gets a magnitude drawn uniformly in
#: its range. Brightness, Color, Contrast and Sharpness are PIL enhancement factors (below 1: only
#: ever weaker); Rotate is in degrees, the shears are shear factors, the translations fractions of
#: the side, Solarize a threshold, Posterize the bits kept.
STRONG_OPS = (("auto_contrast", 0.0, 1.0), ("brightness", 0.05, 0.95), ("color", 0.05, 0.95),
              ("contrast", 0.05, 0.95), ("equalize", 0.0, 1.0), ("identity", 0.0, 1.0),
              ("posterize", 4.0, 8.0), ("rotate", -30.0, 30.0), ("sharpness", 0.05, 0.95),
              ("shear_x", -0.3, 0.3), ("shear_y", -0.3, 0.3), ("solarize", 0.0, 256.0),
              ("translate_x", -0.3, 0.3), ("translate_y", -0.3, 0.3))
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
#: RandAugment ops per image, the largest Cutout side (a fraction of the width) and its fill.
STRONG_NUM_OPS = 2
CUTOUT_MAX = 0.5
CUTOUT_GRAY = (125.0, 123.0, 114.0)


def _broadcast(values: Any) -> Any:
    return values[:, None, None, None]


def _gray(x: Any) -> Any:
    """PIL's L conversion (ITU-R 601-2 luma), kept as float: (B, H, W, 1)."""
    return tf.reduce_sum(x * tf.constant([0.299, 0.587, 0.114]), -1, keepdims=True)


def _blend(degenerate: Any, x: Any, factor: Any) -> Any:
    """PIL's ImageEnhance: ``degenerate + factor (x - degenerate)``, clipped to [0, 255]."""
    return tf.clip_by_value(degenerate + _broadcast(factor) * (x - degenerate), 0.0, 255.0)


def _auto_contrast(x: Any) -> Any:
    low = tf.reduce_min(x, axis=[1, 2], keepdims=True)
    high = tf.reduce_max(x, axis=[1, 2], keepdims=True)
    span = high - low
    stretched = (x - low) * 255.0 / tf.maximum(span, 1.0)
    return tf.where(span > 0, tf.floor(stretched), x)


def _equalize(x: Any) -> Any:
    """PIL's ImageOps.equalize per image and channel: the cumulative histogram (without the
    last occupied level) spread over 255 levels; an image with one level per channel unchanged."""
    shape = tf.shape(x)
    levels = tf.cast(x, tf.int32)
    rows = tf.reshape(tf.transpose(levels, [0, 3, 1, 2]), [shape[0] * 3, -1])  # (B * 3, H * W)
    hist = tf.math.bincount(rows, minlength=256, maxlength=256, axis=-1)
    occupied = tf.cast(hist > 0, tf.int32) * tf.range(256)[None, :]
    last = tf.gather(hist, tf.reduce_max(occupied, -1), batch_dims=1)
    step = (tf.reduce_sum(hist, -1) - last) // 255
    cumulative = tf.cumsum(hist, axis=-1, exclusive=True)
    safe = tf.maximum(step, 1)[:, None]
    lut = tf.minimum((cumulative + safe // 2) // safe, 255)
    lut = tf.where(step[:, None] > 0, lut, tf.range(256)[None, :])
    mapped = tf.gather(lut, rows, batch_dims=1)
    mapped = tf.transpose(tf.reshape(mapped, [shape[0], 3, shape[1], shape[2]]), [0, 2, 3, 1])
    return tf.cast(mapped, tf.float32)


def _sharpness(x: Any, factor: Any) -> Any:
    """PIL's ImageEnhance.Sharpness: blended with its SMOOTH-filtered copy (3x3 kernel, centre
    5, the rest 1, over 13), whose border pixels are the image's own."""
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.round(tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID"))
    smooth = tf.pad(smooth - x[:, 1:-1, 1:-1, :], [[0, 0], [1, 1], [1, 1], [0, 0]]) + x
    return _blend(smooth, x, factor)


def _geometry(name_index: Any, value: Any, height: int, width: int) -> Any:
    """(B, 8) projective transforms (output pixel -> input pixel) of the geometric ops; the
    identity for the others."""
    zeros, ones = tf.zeros_like(value), tf.ones_like(value)
    index = {name: i for i, (name, _, _) in enumerate(STRONG_OPS)}
    angle = -value * (3.141592653589793 / 180.0)  # PIL rotates counter-clockwise
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    candidates = {
        "rotate": [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy],
        # PIL samples at pixel centres: x + 0.5 maps to x + 0.5 + v (y + 0.5)
        "shear_x": [ones, value, value / 2, zeros, ones, zeros],
        "shear_y": [ones, zeros, zeros, value, ones, value / 2],
        "translate_x": [ones, zeros, value * width, zeros, ones, zeros],
        "translate_y": [ones, zeros, zeros, zeros, ones, value * height],
    }
    matrix = tf.stack([ones, zeros, zeros, zeros, ones, zeros], -1)
    for name, rows in candidates.items():
        matrix = tf.where((name_index == index[name])[:, None], tf.stack(rows, -1), matrix)
    return tf.concat([matrix, tf.zeros_like(matrix[:, :2])], -1)


def _strong_op(x: Any, op: Any, magnitude: Any) -> Any:
    """One RandAugment op per image (``op``: an index into ``STRONG_OPS``; ``magnitude`` in
    [0, 1) scaled into its range) on float [0, 255] pixels, rounded back to whole levels."""
    low = tf.gather(tf.constant([lo for _, lo, _ in STRONG_OPS]), op)
    high = tf.gather(tf.constant([hi for _, _, hi in STRONG_OPS]), op)
    value = low + (high - low) * magnitude
    height, width = x.shape[1], x.shape[2]
    gray = _gray(x)
    bits = tf.maximum(tf.floor(value), 1.0)
    bucket = _broadcast(tf.pow(2.0, 8.0 - bits))
    results = {
        "auto_contrast": lambda: _auto_contrast(x),
        "brightness": lambda: _blend(tf.zeros_like(x), x, value),
        "color": lambda: _blend(gray, x, value),
        "contrast": lambda: _blend(tf.round(tf.reduce_mean(gray, axis=[1, 2, 3], keepdims=True)), x, value),
        "equalize": lambda: _equalize(x),
        "posterize": lambda: tf.floor(x / bucket) * bucket,
        "sharpness": lambda: _sharpness(x, value),
        "solarize": lambda: tf.where(x >= _broadcast(value), 255.0 - x, x),
    }
    out = x
    for i, (name, _, _) in enumerate(STRONG_OPS):
        if name in results:
            out = tf.where(_broadcast(tf.equal(op, i)), results[name](), out)
    moved = tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=_geometry(op, value, height, width), output_shape=tf.constant([height, width]),
        fill_value=0.0, interpolation="NEAREST", fill_mode="CONSTANT")
    geometric = tf.reduce_any(tf.stack([tf.equal(op, i) for i, (name, _, _) in enumerate(STRONG_OPS)
                                        if name in GEOMETRIC_OPS]), 0)
    out = tf.where(_broadcast(geometric), moved, out)
    return tf.clip_by_value(tf.round(out), 0.0, 255.0)


def cutout(x: Any, seed: Any, max_fraction: float = CUTOUT_MAX, fill: tuple[float, ...] = CUTOUT_GRAY) -> Any:
    """Cutout as MLKD's authors draw it: a square of side ``u * max_fraction * width`` (u
    uniform per image) around a uniformly drawn centre, clipped to the image, painted ``fill``
    (edges inclusive, as PIL draws a rectangle: at least one pixel)."""
    batch, height, width = tf.shape(x)[0], x.shape[1], x.shape[2]
    draws = tf.random.stateless_uniform([batch, 3], seed)
    side = draws[:, 0] * max_fraction * width
    left = tf.floor(tf.maximum(0.0, draws[:, 1] * width - side / 2))
    top = tf.floor(tf.maximum(0.0, draws[:, 2] * height - side / 2))
    right, bottom = tf.minimum(float(width), left + side), tf.minimum(float(height), top + side)
    cols = tf.range(width, dtype=tf.float32)[None, :]
    rows = tf.range(height, dtype=tf.float32)[None, :]
    in_cols = (cols >= left[:, None]) & (cols <= right[:, None])
    in_rows = (rows >= top[:, None]) & (rows <= bottom[:, None])
    patch = (in_rows[:, :, None] & in_cols[:, None, :])[..., None]
    return tf.where(patch, tf.constant(fill, x.dtype), x)


def strong_batch(images: Any, seed: Any, num_ops: int = STRONG_NUM_OPS) -> Any:
    """MLKD's strong augmentation after the crop and flip: RandAugment (``num_ops`` ops drawn
    per image with replacement from ``STRONG_OPS``, each with its own magnitude) then
    ``cutout``, on a uint8 or float [0, 255] batch; uint8 out. ``seed``: a stateless [2] seed."""
    x = tf.cast(images, tf.float32)
    batch = tf.shape(x)[0]
    seeds = tf.random.experimental.stateless_split(seed, 3)
    ops = tf.random.stateless_uniform([batch, num_ops], seeds[0], 0, len(STRONG_OPS), dtype=tf.int32)
    magnitudes = tf.random.stateless_uniform([batch, num_ops], seeds[1])
    for k in range(num_ops):
        x = _strong_op(x, ops[:, k], magnitudes[:, k])
    return tf.cast(cutout(x, seeds[2]), tf.uint8)
