#!/usr/bin/env python3
"""Classify images with an exported tfkd model, no TensorFlow needed.

    python predict.py model_int8.tflite cat.png dog.jpg
    python predict.py model.onnx photos/            # every image in a folder
    python predict.py model.onnx batch.npy          # (N, H, W, 3) pixels in [0, 255]

Prints the top classes of each input. Labels come from labels.txt beside the model. Images are
turned upright by their EXIF orientation (JPEG), then cropped and resized to the model's input
as training did (``preprocessing`` in model_card.json beside the model: the whole image
stretched, or the centred square of a fraction of the shorter side; without a card, models
above 64 px get the 0.875 centre crop).
Exit codes: 0 done, 2 bad arguments, 3 bad input, 4 bad model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from runtimes import EdgeModel, KitError, KitParser, count

#: The image files tfkd trains on (tfkd.data.sources: the same lists, kept equal by
#: tests/test_data.py), and those read only when this Pillow has a reader for them.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif", ".webp", ".tif", ".tiff")
OPTIONAL_SUFFIXES = {".heic": "HEIC", ".heif": "HEIF", ".avif": "AVIF", ".jxl": "JPEG XL"}
UNREADABLE_SUFFIXES = {".dng": "camera raw", ".cr2": "camera raw", ".cr3": "camera raw", ".nef": "camera raw",
                       ".arw": "camera raw", ".orf": "camera raw", ".rw2": "camera raw", ".raf": "camera raw",
                       ".raw": "camera raw", ".svg": "a vector drawing"}


def readable_suffixes() -> tuple[str, ...]:
    """``IMAGE_SUFFIXES`` and the ``OPTIONAL_SUFFIXES`` this Pillow opens."""
    from PIL import Image

    Image.init()
    opened = {ext for ext, kind in Image.registered_extensions().items() if kind in Image.OPEN}
    return IMAGE_SUFFIXES + tuple(s for s in OPTIONAL_SUFFIXES if s in opened)


def unreadable_reason(suffix: str) -> str | None:
    """Why image files with ``suffix`` cannot be read here (None for a readable or non-image one)."""
    if suffix in OPTIONAL_SUFFIXES and suffix not in readable_suffixes():
        return (f"{OPTIONAL_SUFFIXES[suffix]}: this Pillow has no reader for it (a plugin such as "
                "pillow-heif adds one), or convert the files to JPEG or PNG")
    if suffix in UNREADABLE_SUFFIXES:
        return f"{UNREADABLE_SUFFIXES[suffix]}: convert the files to JPEG or PNG"
    return None


#: The background a transparent pixel shows (tfkd.data.transforms.BACKGROUND): white.
BACKGROUND = 255


def _composite(rgba: np.ndarray) -> np.ndarray:
    """RGBA uint8 over the white background, as training does: (c * a + 255 * (255 - a) + 127) // 255."""
    color, alpha = rgba[..., :3].astype(np.uint32), rgba[..., 3:].astype(np.uint32)
    return ((color * alpha + BACKGROUND * (255 - alpha) + 127) // 255).astype(np.uint8)


def _to_rgb(image):
    """RGB at 8 bits as tfkd's training decodes it: 16-bit images keep their high byte (a plain
    ``convert("RGB")`` clips 16-bit grayscale to white); alpha (RGBA, gray + alpha, a palette
    with transparency) is composited on white."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.uint32)
        if image.mode == "I" and values.max(initial=0) <= 255:
            gray = values.astype(np.uint8)
        else:
            gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return Image.fromarray(_composite(np.asarray(image.convert("RGBA"))), "RGB")
    return image.convert("RGB")


#: Above this side, training resized and centre-cropped (tfkd.data.transforms); up to it, stretched.
SMALL_MAX = 64


def preprocessing_of(model_path: Path, size: tuple[int, int]) -> dict:
    """How training brought images to the model's input: the ``preprocessing`` record of
    ``model_card.json`` beside the model, else tfkd's rule for the input size."""
    import json

    card = model_path.parent / "model_card.json"
    try:
        record = json.loads(card.read_text()).get("preprocessing") if card.is_file() else None
    except (OSError, ValueError, AttributeError):
        record = None
    if isinstance(record, dict) and record.get("resize") in ("stretch", "center_crop"):
        return record
    if max(size) <= SMALL_MAX:
        return {"resize": "stretch"}
    return {"resize": "center_crop", "crop_fraction": 0.875}


def crop_box(width: int, height: int, preprocessing: dict) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the region resized to the input: the whole image, or the
    centred square of ``crop_fraction`` x the shorter side (as ``tfkd.data.transforms``)."""
    if preprocessing.get("resize") != "center_crop":
        return 0, 0, width, height
    side = max(int(round(min(width, height) * float(preprocessing.get("crop_fraction", 0.875)))), 1)
    top, left = (height - side) // 2, (width - side) // 2
    return left, top, left + side, top + side


def load_image(path: Path, size: tuple[int, int], preprocessing: dict | None = None) -> np.ndarray:
    """Any image file (grayscale, RGBA, 16-bit included) as RGB float32 pixels at ``size``,
    cropped and resized as training did (``preprocessing``: ``preprocessing_of``)."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    preprocessing = preprocessing or {"resize": "stretch"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                if image.format != "PNG":  # upright, as training turns it (EXIF orientation)
                    image = ImageOps.exif_transpose(image)
                image = _to_rgb(image)
            box = crop_box(image.size[0], image.size[1], preprocessing)
            if box != (0, 0, size[1], size[0]) or image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.BILINEAR, box=box)
            return np.asarray(image, dtype=np.float32)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise KitError(f"{path}: image too large to decode safely (over {Image.MAX_IMAGE_PIXELS:,} "
                       "pixels: a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise KitError(f"{path}: not a readable image") from None


def load_inputs(paths: list[str], size: tuple[int, int],
                preprocessing: dict | None = None) -> tuple[list[str], np.ndarray]:
    """Names and pixel batch for the command-line inputs (files, folders, .npy batches)."""
    names, batches = [], []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise KitError(f"{path}: not found")
        if path.is_dir():
            readable = readable_suffixes()
            entries = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())  # ._x.png: macOS's
            files = [p for p in entries if p.suffix.lower() in readable]
            left = [f"{sum(1 for p in entries if p.suffix.lower() == suffix)} {suffix} file(s) left out "
                    f"({unreadable_reason(suffix)})"
                    for suffix in sorted({p.suffix.lower() for p in entries if unreadable_reason(p.suffix.lower())})]
            if not files:
                raise KitError(f"{path}: no images in this folder" + (f"; {'; '.join(left)}" if left else ""))
            for line in left:
                print(f"predict: note: {path}: {line}", file=sys.stderr)
            names += [str(p) for p in files]
            batches.append(np.stack([load_image(p, size, preprocessing) for p in files]))
        elif path.suffix.lower() == ".npy":
            try:
                array = np.load(path, allow_pickle=False)
            except ValueError:
                raise KitError(f"{path}: not a plain .npy array") from None
            if array.ndim == 3:
                array = array[None]
            names += [f"{path}[{i}]" for i in range(len(array))]
            batches.append(array)
        elif path.suffix.lower() in readable_suffixes():
            names.append(str(path))
            batches.append(load_image(path, size, preprocessing)[None])
        elif unreadable_reason(path.suffix.lower()):
            raise KitError(f"{path}: {unreadable_reason(path.suffix.lower())}")
        else:
            raise KitError(f"{path}: unsupported file type '{path.suffix}' (images: "
                           f"{', '.join(readable_suffixes())}; arrays: .npy)")
    shapes = {b.shape[1:] for b in batches}
    if len(shapes) > 1:
        raise KitError(f"inputs have different shapes {sorted(shapes)}")
    return names, np.concatenate(batches)


def read_labels(model_path: Path, labels: str | None, classes: int) -> list[str]:
    """Class names: ``labels`` (or labels.txt beside the model), one per line; class numbers
    when there is no labels file beside the model. A file of the wrong length is an error."""
    path = Path(labels) if labels else model_path.parent / "labels.txt"
    if not path.is_file():
        if labels:
            raise KitError(f"{path}: labels file not found", 2)
        return [str(i) for i in range(classes)]
    try:
        names = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        raise KitError(f"{path}: not a readable text file of labels") from None
    if names and not names[-1].strip():
        names = names[:-1]
    if len(names) != classes:
        raise KitError(f"{path}: {len(names)} labels for a model with {classes} classes")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = KitParser(prog="predict", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a .onnx or .tflite file from tfkd.export")
    parser.add_argument("inputs", nargs="+", help="image files, folders of images, or .npy batches")
    parser.add_argument("--top", type=count(1), default=3, help="classes to show per input (default 3)")
    parser.add_argument("--labels", help="labels file (default: labels.txt beside the model)")
    parser.add_argument("--threads", type=count(0), default=0, help="runtime threads (default: runtime's)")
    parser.add_argument("--image-size", type=count(1),
                        help="side in pixels, for a model that takes any image size")
    args = parser.parse_args(argv)
    try:
        model = EdgeModel(args.model, args.threads, args.image_size)
        names, images = load_inputs(args.inputs, model.image_size,
                                    preprocessing_of(Path(args.model), model.image_size))
        probabilities = model.probabilities(model.check(images))
        labels = read_labels(Path(args.model), args.labels, probabilities.shape[1])
    except KitError as error:
        print(f"predict: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("predict: interrupted", file=sys.stderr)
        return 130
    for name, probs in zip(names, probabilities):
        best = np.argsort(probs)[::-1][: args.top]
        print(f"{name}: " + ", ".join(f"{labels[i]} {probs[i]:.3f}" for i in best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
