"""The image geometry of every pipeline: how a decoded image becomes the model's input.

Two recipes, chosen by the run's image size (``data.image_size``):

- small images (up to ``SMALL_MAX`` = 64 px, CIFAR's world): the image is resized to
  ``size x size`` whatever its aspect ratio; training pads it by 4 (reflect) and crops a random
  window of the original size, with an optional horizontal flip (``augment_batch``, per batch);
- larger images (the ImageNet recipe): evaluation takes the centred square of side
  ``crop_fraction`` x the shorter side (``eval_window``) and resizes it to ``size x size``
  (0.875: the 224-of-256 crop); training takes a random-resized crop (``train_window``: 8% to
  100% of the area by default, aspect ratio 3/4 to 4/3) and flips half of the images.

Images are upright first: a JPEG's EXIF orientation (a phone photo stored sideways) is applied
as Pillow's ``exif_transpose`` applies it in the ``export/`` kit. Windows are integer pixel boxes
of the upright image, so an upright JPEG decodes only the window it needs
(``tf.io.decode_and_crop_jpeg``); resizing is bilinear with antialiasing, which is what the
``export/`` kit's Pillow resize of the same box does on a device (``crop_box`` there). Between a
decoded file and the model's input there is one resize, in both pipelines: the in-memory one
keeps larger training images at a bounded size and finds the same windows of the original on the
stored copy (``train_stored``, ``eval_stored``: a fractional box resampled once, ``resize_box``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
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


#: Bytes at the start of a JPEG that hold its EXIF block (APP1 segments are at most 64 KiB).
EXIF_BYTES = 1 << 17


def _exif_orientation(head: bytes) -> np.int32:
    """The EXIF orientation (1-8) of a JPEG's first bytes, as Pillow reads it (1 when absent
    or unreadable): the same reader as the ``export/`` kit's ``ImageOps.exif_transpose``."""
    import io

    from PIL import Image

    head = head.item() if isinstance(head, np.ndarray) else head  # tf.numpy_function: a 0-d array
    try:
        with Image.open(io.BytesIO(head)) as image:
            value = int(image.getexif().get(0x0112, 1))
    except Exception:  # no EXIF, a damaged block: upright as stored
        value = 1
    return np.int32(value if 1 <= value <= 8 else 1)


def orientation(contents: Any) -> Any:
    """The EXIF orientation of encoded image bytes: a JPEG's (phone photos are stored sideways
    with orientation 6 or 8), 1 for other formats."""
    return tf.cond(is_jpeg(contents),
                   lambda: tf.reshape(tf.numpy_function(_exif_orientation, [tf.strings.substr(contents, 0, EXIF_BYTES)],
                                                        tf.int32, stateful=False), []),
                   lambda: tf.constant(1, tf.int32))


def orient(image: Any, value: Any) -> Any:
    """``image`` turned upright for EXIF orientation ``value``, as Pillow's ``exif_transpose``:
    2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate
    90 counter-clockwise."""
    transposed = lambda: tf.transpose(image, [1, 0, 2])  # noqa: E731
    return tf.switch_case(tf.clip_by_value(value, 1, 8) - 1, [
        lambda: image,
        lambda: tf.reverse(image, [1]),
        lambda: tf.reverse(image, [0, 1]),
        lambda: tf.reverse(image, [0]),
        transposed,
        lambda: tf.reverse(transposed(), [1]),
        lambda: tf.reverse(transposed(), [0, 1]),
        lambda: tf.reverse(transposed(), [0]),
    ])


def image_shape(contents: Any, turn: Any = None) -> Any:
    """(height, width) of encoded image bytes as displayed (after the EXIF orientation ``turn``,
    read when not given): from the JPEG header, else by decoding."""
    turn = orientation(contents) if turn is None else turn
    return tf.cond(is_jpeg(contents),
                   lambda: tf.cond(turn >= 5, lambda: tf.reverse(tf.image.extract_jpeg_shape(contents)[:2], [0]),
                                   lambda: tf.image.extract_jpeg_shape(contents)[:2]),
                   lambda: tf.shape(decode(contents, turn))[:2])


def is_png(contents: Any) -> Any:
    """True for PNG bytes."""
    return tf.equal(tf.strings.substr(contents, 0, 8), b"\x89PNG\r\n\x1a\n")


#: The background a transparent pixel shows: white, as an image viewer or a web page shows it.
#: The ``export/`` kit composites on the same background (``predict._to_rgb``).
BACKGROUND = 255


def composite(color: Any, alpha: Any) -> Any:
    """uint8 ``color`` over the white ``BACKGROUND`` with uint8 ``alpha``, in integers:
    (c * a + 255 * (255 - a) + 127) // 255, the kit's formula to the level."""
    c, a = tf.cast(color, tf.int32), tf.cast(alpha, tf.int32)
    return tf.cast((c * a + BACKGROUND * (255 - a) + 127) // 255, tf.uint8)


def _rgb(image: Any) -> Any:
    """A uint8 image of 1 to 4 channels (gray, gray + alpha, RGB, RGBA) as RGB; alpha is
    composited on ``BACKGROUND``."""
    channels = tf.shape(image)[-1]
    color = tf.cond(channels < 3, lambda: tf.tile(image[..., :1], [1, 1, 3]), lambda: image[..., :3])
    return tf.cond(tf.equal(channels % 2, 0), lambda: composite(color, image[..., -1:]), lambda: color)


def pillow_rgb(contents: Any) -> np.ndarray:
    """Encoded bytes of any format Pillow reads (WebP, TIFF, BMP, GIF, ...) as uint8 RGB, exactly
    as the ``export/`` kit's ``predict._to_rgb`` makes it: upright by its EXIF orientation, the
    first frame, 16-bit kept to its high byte, alpha composited on white."""
    import io

    from PIL import Image, ImageOps

    contents = contents.item() if isinstance(contents, np.ndarray) else contents  # tf.numpy_function
    with Image.open(io.BytesIO(contents)) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            values = np.asarray(image, dtype=np.uint32)
            gray = values.astype(np.uint8) if image.mode == "I" and values.max(initial=0) <= 255 \
                else (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=-1)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = np.asarray(image.convert("RGBA")).astype(np.uint32)
            color, alpha = rgba[..., :3], rgba[..., 3:]
            return ((color * alpha + BACKGROUND * (255 - alpha) + 127) // 255).astype(np.uint8)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode(contents: Any, turn: Any = None) -> Any:
    """Any image file Pillow reads as uint8 RGB, upright. PNG and JPEG are decoded by TensorFlow
    (a JPEG turned by its EXIF orientation ``turn``, read when not given; 16-bit keeps its high
    byte; a PNG's alpha (RGBA, gray + alpha, a palette with transparency) is composited on
    white); every other format (WebP, TIFF, BMP, GIF, ...) by Pillow, as the kit decodes it
    (``pillow_rgb``)."""
    turn = orientation(contents) if turn is None else turn

    def pillow() -> Any:
        return tf.numpy_function(pillow_rgb, [contents], tf.uint8, stateful=False)

    image = tf.cond(is_png(contents),
                    lambda: _rgb(tf.io.decode_image(contents, channels=0, expand_animations=False, dtype=tf.uint8)),
                    lambda: tf.cond(is_jpeg(contents),
                                    lambda: tf.io.decode_image(contents, channels=3, expand_animations=False,
                                                               dtype=tf.uint8),
                                    pillow))
    image.set_shape([None, None, 3])
    image = orient(image, turn)
    image.set_shape([None, None, 3])
    return image


def _decode_window(contents: Any, window: tuple[Any, Any, Any, Any], turn: Any) -> Any:
    """The ``window`` (of the upright image) of encoded bytes: an upright JPEG decodes only that
    window; a turned one, like other formats, is decoded whole, turned, then cropped."""
    top, left, height, width = window
    crop = tf.stack([top, left, height, width])
    return tf.cond(tf.logical_and(is_jpeg(contents), tf.equal(turn, 1)),
                   lambda: tf.io.decode_and_crop_jpeg(contents, crop, channels=3),
                   lambda: tf.slice(decode(contents, turn), [top, left, 0], [height, width, 3]))


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
    turn = orientation(contents)
    height_width = image_shape(contents, turn)
    window = eval_window(height_width[0], height_width[1], geometry)
    return resize(_decode_window(contents, window, turn), geometry.size)


def train_bytes(contents: Any, seed: Any, geometry: Geometry) -> Any:
    """Encoded image -> uint8 training input: the evaluation resize for the small recipe (its
    augmentation runs per batch), a random-resized crop (+ flip) for larger images."""
    if geometry.small:
        return resize(decode(contents), geometry.size)
    turn = orientation(contents)
    height_width = image_shape(contents, turn)
    seeds = tf.random.experimental.stateless_split(seed, 2)
    window = train_window(height_width[0], height_width[1], seeds[0], geometry)
    return _flip(resize(_decode_window(contents, window, turn), geometry.size), seeds[1], geometry.hflip)


def resize_to(image: Any, height: Any, width: Any) -> Any:
    """uint8 ``height x width`` (bilinear, antialiased): a training image stored below its
    decoded size (``tfkd.data.memory``)."""
    out = tf.image.resize(image, tf.stack([height, width]), method="bilinear", antialias=True)
    out = tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
    out.set_shape([None, None, 3])
    return out


def resize_box(image: Any, box: tuple[Any, Any, Any, Any], size: int) -> Any:
    """uint8 ``size x size`` of the region ``box`` = (top, left, bottom, right) of ``image``, in
    pixels and possibly fractional: the pixels under the box (the whole ones it touches) resampled
    once, bilinear and antialiased, the box's edges mapped to the output's. An integer box gives
    exactly ``resize`` of that slice (the same kernel, ``tf.image.resize``'s); a fractional one is
    a window of the original image on a copy stored smaller (the in-memory training store)."""
    top, left, bottom, right = (tf.cast(v, tf.float32) for v in box)
    shape = tf.shape(image)
    row0 = tf.clip_by_value(tf.cast(tf.floor(top), tf.int32), 0, shape[0] - 1)
    col0 = tf.clip_by_value(tf.cast(tf.floor(left), tf.int32), 0, shape[1] - 1)
    row1 = tf.clip_by_value(tf.cast(tf.math.ceil(bottom), tf.int32), row0 + 1, shape[0])
    col1 = tf.clip_by_value(tf.cast(tf.math.ceil(right), tf.int32), col0 + 1, shape[1])
    region = tf.cast(image[row0:row1, col0:col1], tf.uint8)
    scale = tf.stack([float(size) / tf.maximum(bottom - top, 1e-6), float(size) / tf.maximum(right - left, 1e-6)])
    translation = -tf.stack([top - tf.cast(row0, tf.float32), left - tf.cast(col0, tf.float32)]) * scale
    out = tf.raw_ops.ScaleAndTranslate(images=region[None], size=tf.constant([size, size]), scale=scale,
                                       translation=translation, kernel_type="triangle", antialias=True)[0]
    out = tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
    out.set_shape([size, size, 3])
    return out


def _stored_box(window: tuple[Any, Any, Any, Any], original: Any, stored: Any) -> tuple[Any, Any, Any, Any]:
    """(top, left, bottom, right) in a stored copy of ``stored`` = (height, width) pixels of a
    window (top, left, height, width) of the ``original`` = (height, width) image."""
    scale_y = tf.cast(stored[0], tf.float32) / tf.cast(original[0], tf.float32)
    scale_x = tf.cast(stored[1], tf.float32) / tf.cast(original[1], tf.float32)
    top, left, height, width = (tf.cast(v, tf.float32) for v in window)
    return top * scale_y, left * scale_x, (top + height) * scale_y, (left + width) * scale_x


def eval_stored(image: Any, original: Any, geometry: Geometry) -> Any:
    """A training image stored at another size than its original ``(height, width)`` -> its
    evaluation input: the original's evaluation window, found on the stored copy, resized once."""
    window = eval_window(original[0], original[1], geometry)
    return resize_box(image, _stored_box(window, original, tf.shape(image)[:2]), geometry.size)


def train_stored(image: Any, original: Any, seed: Any, geometry: Geometry) -> Any:
    """A training image stored at another size than its original ``(height, width)`` -> a
    random-resized crop (+ flip): the window ``train_bytes`` takes of the original for the same
    ``seed`` (drawn on the original's shape), found on the stored copy and resized once."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    window = train_window(original[0], original[1], seeds[0], geometry)
    crop = resize_box(image, _stored_box(window, original, tf.shape(image)[:2]), geometry.size)
    return _flip(crop, seeds[1], geometry.hflip)


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
