"""The header scan: every image file of a folder dataset checked before training starts.

Opening a file's header (Pillow reads only the first bytes) and its last bytes (a JPEG ends with
its end-of-image marker, a PNG with its ``IEND`` chunk) finds what would otherwise stop a
streamed epoch half-way: files that are not images, truncated downloads, empty files. A file
whose header is fine but whose end is not is decoded in full once, to tell a truncated image
from one with harmless trailing bytes; a format Pillow decodes in training (WebP, TIFF, BMP,
GIF, ...) is decoded once in full.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

#: Pillow's names of the formats TensorFlow decodes in the pipelines (window by window for
#: JPEG); every other format Pillow reads is decoded by Pillow (``transforms.pillow_rgb``).
DECODABLE = ("JPEG", "PNG", "MPO")
#: Larger images are refused (Pillow's decompression-bomb threshold, doubled).
MAX_PIXELS = 2 * 89_478_485
_ENDINGS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
_TAIL = 1024


@dataclass
class ScanResult:
    """The files that passed and, for those that did not, why (path -> reason)."""

    good: list[str] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)


def check_file(path: str) -> str | None:
    """Why ``path`` cannot be trained on, or None when it can."""
    from PIL import Image, UnidentifiedImageError

    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with Image.open(path) as image:
            kind, (width, height) = image.format, image.size
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        return f"unreadable ({type(error).__name__})"
    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        return f"{width}x{height} pixels: too large to decode safely"
    if kind not in DECODABLE:  # decoded by Pillow in training: decoded once here, in full
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as error:  # Pillow raises many types for a damaged file
            return f"a {kind} image Pillow cannot decode ({type(error).__name__})"
        return None
    ending = _ENDINGS.get(kind)
    if ending is not None:
        with open(path, "rb") as f:
            f.seek(max(0, size - _TAIL))
            tail = f.read()
        if ending not in tail and not _decodes(path):
            return "truncated (no end-of-image marker, and it does not decode)"
    return None


def _decodes(path: str) -> bool:
    import tensorflow as tf

    try:
        tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return True
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
        return False


def scan(paths: Sequence[str], what: str = "scanning", threads: int = 16) -> ScanResult:
    """Checks every file (in threads: the work is mostly waiting for the disk), with progress."""
    from tqdm import tqdm

    result = ScanResult()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        reasons = list(tqdm(pool.map(check_file, paths, chunksize=64), total=len(paths), desc=what,
                            unit="file", disable=len(paths) < 2000))
    for path, reason in zip(paths, reasons):
        if reason is None:
            result.good.append(path)
        else:
            result.bad[path] = reason
    return result


def first_problem(result: ScanResult) -> str:
    """One line naming the first bad file and how many more there are."""
    path, reason = next(iter(result.bad.items()))
    more = len(result.bad) - 1
    return f"{Path(path)}: unreadable image ({reason})" + (f"; {more} more bad file(s)" if more else "")
