#!/usr/bin/env python3
"""Classify images with an exported tfkd model, no TensorFlow needed.

    python predict.py model_int8.tflite cat.png dog.jpg
    python predict.py model.onnx photos/            # every image in a folder
    python predict.py model.onnx batch.npy          # (N, H, W, 3) pixels in [0, 255]

Prints the top classes of each input. Labels come from labels.txt beside the model.
Exit codes: 0 done, 2 bad arguments, 3 bad input, 4 bad model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from runtimes import EdgeModel, KitError, softmax

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def load_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Any image file (grayscale and RGBA included) as RGB float32 pixels at ``size``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(image, dtype=np.float32)
    except (UnidentifiedImageError, OSError):
        raise KitError(f"{path}: not a readable image") from None


def load_inputs(paths: list[str], size: tuple[int, int]) -> tuple[list[str], np.ndarray]:
    """Names and pixel batch for the command-line inputs (files, folders, .npy batches)."""
    names, batches = [], []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise KitError(f"{path}: not found")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise KitError(f"{path}: no images in this folder")
            names += [str(p) for p in files]
            batches.append(np.stack([load_image(p, size) for p in files]))
        elif path.suffix.lower() == ".npy":
            try:
                array = np.load(path, allow_pickle=False)
            except ValueError:
                raise KitError(f"{path}: not a plain .npy array") from None
            if array.ndim == 3:
                array = array[None]
            names += [f"{path}[{i}]" for i in range(len(array))]
            batches.append(array)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            names.append(str(path))
            batches.append(load_image(path, size)[None])
        else:
            raise KitError(f"{path}: unsupported file type '{path.suffix}' (images: "
                           f"{', '.join(IMAGE_SUFFIXES)}; arrays: .npy)")
    shapes = {b.shape[1:] for b in batches}
    if len(shapes) > 1:
        raise KitError(f"inputs have different shapes {sorted(shapes)}")
    return names, np.concatenate(batches)


def read_labels(model_path: Path, labels: str | None, count: int) -> list[str]:
    path = Path(labels) if labels else model_path.parent / "labels.txt"
    if path.is_file():
        names = path.read_text().splitlines()
        if len(names) == count:
            return names
    return [str(i) for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a .onnx or .tflite file from tfkd.export")
    parser.add_argument("inputs", nargs="+", help="image files, folders of images, or .npy batches")
    parser.add_argument("--top", type=int, default=3, help="classes to show per input (default 3)")
    parser.add_argument("--labels", help="labels file (default: labels.txt beside the model)")
    parser.add_argument("--threads", type=int, default=0, help="runtime threads (default: runtime's)")
    args = parser.parse_args(argv)
    try:
        model = EdgeModel(args.model, args.threads)
        names, images = load_inputs(args.inputs, model.image_size)
        probabilities = softmax(model.logits(model.check(images)))
    except KitError as error:
        print(f"predict: error: {error}", file=sys.stderr)
        return error.exit_code
    labels = read_labels(Path(args.model), args.labels, probabilities.shape[1])
    for name, probs in zip(names, probabilities):
        best = np.argsort(probs)[::-1][: args.top]
        print(f"{name}: " + ", ".join(f"{labels[i]} {probs[i]:.3f}" for i in best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
