"""Where images come from: CIFAR python batches, scikit-learn's digits, TensorFlow Datasets
(CIFAR by name), and image folders.

Array sources (``Source``) hold decoded uint8 NHWC images and int32 labels; a folder is first a
``FileList`` (paths and labels per split, nothing decoded) that the in-memory pipeline decodes
and the streaming pipeline reads file by file.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tfkd.errors import DataError

#: Image files a folder dataset trains on (the ``export/`` kit reads the same): PNG and JPEG
#: decoded by TensorFlow, the others by Pillow (``transforms.decode``).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif", ".webp", ".tif", ".tiff")
#: Image formats Pillow reads only in some builds or with a plugin: trained on when this
#: Pillow reads them (``readable_suffixes``), else left out and named with the reason.
OPTIONAL_SUFFIXES = {".heic": "HEIC", ".heif": "HEIF", ".avif": "AVIF", ".jxl": "JPEG XL"}
#: Image files no decoder here reads: left out and named, with what to do.
UNREADABLE_SUFFIXES = {".dng": "camera raw", ".cr2": "camera raw", ".cr3": "camera raw", ".nef": "camera raw",
                       ".arw": "camera raw", ".orf": "camera raw", ".rw2": "camera raw", ".raf": "camera raw",
                       ".raw": "camera raw", ".svg": "a vector drawing"}
#: Characters that end a line of ``labels.txt`` (``str.splitlines``): not in a class name.
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
CIFAR_FILES = {
    "cifar10": (["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"],
                ["test_batch"], "batches.meta", b"label_names", b"labels"),
    "cifar100": (["train"], ["test"], "meta", b"fine_label_names", b"fine_labels"),
}
#: Folder names of a folder dataset's splits (the first that exists counts).
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}


@dataclass
class Source:
    """A dataset as decoded uint8 arrays: images (N, H, W, 3) and int32 labels (N,).
    ``val_images``/``val_labels`` are set when the source has its own validation split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    val_images: Optional[np.ndarray] = None
    val_labels: Optional[np.ndarray] = None


# --------------------------------------------------------------------------------- CIFAR
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


def load_tfds_cifar(name: str) -> Source:
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


def load_digits() -> Source:
    """scikit-learn's bundled 8x8 digits, upsampled to 32x32x3; fixed stratified 80/20 split."""
    import tensorflow as tf
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


# -------------------------------------------------------------------------------- folders
@dataclass
class FileList:
    """A folder dataset before decoding: per split, file paths and labels."""

    root: str
    class_names: list[str]
    paths: dict[str, list[str]] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: int = 0
    notes: list[str] = field(default_factory=list)

    def count(self, split: str) -> int:
        """How many images ``split`` has (0 when the folder has no such split)."""
        return len(self.paths.get(split, []))


#: Entries that cameras, photo managers, Jupyter and macOS leave in folders and that a file
#: manager hides: not data. Names starting with "." (``.ipynb_checkpoints``, ``.thumbnails``,
#: AppleDouble ``._photo.jpg``) and these.
HIDDEN_NAMES = ("__MACOSX", "Thumbs.db", "desktop.ini", "$RECYCLE.BIN")


def is_hidden(name: str) -> bool:
    """True for a file or folder name a user does not see as data (``HIDDEN_NAMES``, dot-names)."""
    return name.startswith(".") or name in HIDDEN_NAMES


def readable_suffixes() -> tuple[str, ...]:
    """``IMAGE_SUFFIXES`` and the ``OPTIONAL_SUFFIXES`` this Pillow opens."""
    from PIL import Image

    Image.init()
    opened = {ext for ext, kind in Image.registered_extensions().items() if kind in Image.OPEN}
    return IMAGE_SUFFIXES + tuple(s for s in OPTIONAL_SUFFIXES if s in opened)


def unreadable_reason(suffix: str) -> str | None:
    """Why image files with ``suffix`` are left out (None for a readable or a non-image suffix)."""
    if suffix in OPTIONAL_SUFFIXES and suffix not in readable_suffixes():
        return (f"{OPTIONAL_SUFFIXES[suffix]}: this Pillow has no reader for it (a plugin such as "
                "pillow-heif adds one), or convert the files to JPEG or PNG")
    if suffix in UNREADABLE_SUFFIXES:
        return f"{UNREADABLE_SUFFIXES[suffix]}: convert the files to JPEG or PNG"
    return None


def _class_files(folder: Path) -> tuple[list[Path], int, int, dict[str, int]]:
    """The image files of one class folder, nested sub-folders included (as Keras's
    ``image_dataset_from_directory`` reads them); how many of them are nested; how many image
    files were left out for being hidden (or in a hidden folder); and how many were left out
    for a format no decoder here reads, by suffix."""
    readable = readable_suffixes()
    visible = [p for p in sorted(folder.rglob("*"))
               if p.is_file() and not any(is_hidden(part) for part in p.relative_to(folder).parts)]
    files = [p for p in visible if p.suffix.lower() in readable]
    hidden = sum(1 for p in folder.rglob("*") if p.suffix.lower() in readable and p.is_file()) - len(files)
    unreadable: dict[str, int] = {}
    for p in visible:
        if unreadable_reason(p.suffix.lower()):
            unreadable[p.suffix.lower()] = unreadable.get(p.suffix.lower(), 0) + 1
    return files, sum(1 for p in files if p.parent != folder), hidden, unreadable


def check_class_name(folder: Path) -> None:
    """A class folder's name must be one line of ``labels.txt`` in UTF-8: ``DataError`` naming
    the folder otherwise."""
    name = folder.name
    breaks = sorted({c for c in name if c in LINE_BREAKS})
    if breaks:
        raise DataError(f"{str(folder)!r}: a class folder name with a line break "
                        f"({', '.join(repr(c) for c in breaks)}) cannot be one line of labels.txt; rename the folder")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{str(folder)!r}: a class folder name that is not valid UTF-8 cannot be a line of "
                        "labels.txt; rename the folder") from None


def _split_folder(root: Path, split: str) -> Path | None:
    for name in SPLIT_FOLDERS[split]:
        if (root / name).is_dir():
            return root / name
    return None


def list_folder(root: str, test_fraction: float = 0.1) -> FileList:
    """Lists ``root``'s images without decoding them.

    Two layouts: ``root/train/<class>/**`` and ``root/test/<class>/**`` (and optionally
    ``root/val/<class>/**``), or ``root/<class>/**`` alone, of which a stratified
    ``test_fraction`` becomes the test split (the same for every seed). Classes are the training
    folder's sub-folders (at least two); images in nested folders of a class belong to it.
    """
    from sklearn.model_selection import train_test_split

    root_path = Path(root)
    if not root_path.is_dir():
        raise DataError(f"{root}: image folder not found")
    split_layout = _split_folder(root_path, "train") is not None
    train_dir = _split_folder(root_path, "train") or root_path
    class_dirs = sorted(p for p in train_dir.glob("*") if p.is_dir() and not is_hidden(p.name))
    if not class_dirs:
        raise DataError(f"{root_path / 'train'}: expected one sub-folder per class (or "
                        f"{root_path}/<class>/ folders)")
    if len(class_dirs) < 2:
        raise DataError(f"{train_dir}: one class folder ({class_dirs[0].name}); a classifier "
                        "needs at least two")
    for folder in class_dirs:
        check_class_name(folder)
    class_names = [p.name for p in class_dirs]
    listing = FileList(str(root_path), class_names)
    folders = {"train": train_dir}
    if split_layout:
        test_dir = _split_folder(root_path, "test")
        if test_dir is None:
            raise DataError(f"{root_path / 'test'}: missing split folder")
        folders["test"] = test_dir
        val_dir = _split_folder(root_path, "val")
        if val_dir is not None:
            folders["val"] = val_dir
    for split, split_dir in folders.items():
        unknown = sorted(p.name for p in split_dir.iterdir()
                         if p.is_dir() and p.name not in class_names and not is_hidden(p.name))
        if unknown:
            raise DataError(f"{split_dir}: class folders {unknown} are not in {train_dir}")
        files: list[tuple[Path, int]] = []
        nested = hidden = 0
        unreadable: dict[str, int] = {}
        for label, name in enumerate(class_names):
            class_files, class_nested, class_hidden, class_unreadable = _class_files(split_dir / name) \
                if (split_dir / name).is_dir() else ([], 0, 0, {})
            if split == "train" and not class_files:
                left = "; ".join(f"{n} {s} file(s) left out: {unreadable_reason(s)}"
                                 for s, n in sorted(class_unreadable.items()))
                raise DataError(f"{split_dir / name}: empty class folder (no {'/'.join(readable_suffixes())} "
                                f"files{'; ' + left if left else ''})")
            files += [(p, label) for p in class_files]
            nested += class_nested
            hidden += class_hidden
            for suffix, n in class_unreadable.items():
                unreadable[suffix] = unreadable.get(suffix, 0) + n
        if hidden:
            listing.notes.append(f"{split_dir}: {hidden} hidden image files left out (names starting "
                                 "with '.', such as macOS's ._ copies, or in hidden folders)")
        for suffix, n in sorted(unreadable.items()):
            listing.notes.append(f"{split_dir}: {n} {suffix} file(s) left out ({unreadable_reason(suffix)})")
        if not files:
            raise DataError(f"{split_dir}: no images")
        if nested:
            listing.notes.append(f"{split_dir}: {nested} of {len(files)} images are in nested folders "
                                 "of their class folder; they count as that class")
        listing.paths[split] = [str(p) for p, _ in files]
        listing.labels[split] = np.array([label for _, label in files], np.int32)
    if not split_layout:
        paths, labels = listing.paths["train"], listing.labels["train"]
        if round(test_fraction * len(labels)) < len(class_names) or len(labels) - round(test_fraction * len(labels)) < len(class_names):
            raise DataError(f"{root_path}: {len(labels)} images cannot give a test split of "
                            f"data.test_fraction={test_fraction} with every one of its "
                            f"{len(class_names)} classes on both sides")
        train_paths, test_paths, train_labels, test_labels = train_test_split(
            paths, labels, test_size=test_fraction, stratify=labels, random_state=0)
        listing.paths.update(train=list(train_paths), test=list(test_paths))
        listing.labels.update(train=np.asarray(train_labels, np.int32), test=np.asarray(test_labels, np.int32))
        listing.notes.append(f"{root_path}: no train/ and test/ folders: {test_fraction:.0%} of its "
                             f"{len(labels)} images (stratified, the same for every seed) are the "
                             "test split (data.test_fraction)")
    return listing


def check_files(listing: FileList, skip_bad_files: bool) -> FileList:
    """The header scan (``tfkd.data.scan``) of every file: a bad file stops the run naming it,
    or with ``skip_bad_files`` is left out and counted."""
    from tfkd.data import scan

    every = [p for split in listing.paths for p in listing.paths[split]]
    result = scan.scan(every, f"checking {listing.root}")
    if not result.bad:
        return listing
    if not skip_bad_files:
        raise DataError(scan.first_problem(result) + " (data.skip_bad_files=true leaves bad files out)")
    for split in list(listing.paths):
        paths, labels = listing.paths[split], listing.labels[split]
        keep = [i for i, p in enumerate(paths) if p not in result.bad]
        emptied = sorted(set(labels.tolist()) - set(labels[keep].tolist()))
        listing.paths[split], listing.labels[split] = [paths[i] for i in keep], labels[keep]
        if emptied:
            name = listing.class_names[emptied[0]]
            first = next(p for p, label in zip(paths, labels) if label == emptied[0])
            what = {"train": "training", "val": "validation", "test": "test"}.get(split, split)
            raise DataError(f"{listing.root}: data.skip_bad_files would leave class {name!r} with no {what} "
                            f"images (every one of them is bad, such as {Path(first)}: "
                            f"{result.bad[first]})" + (f"; {len(emptied) - 1} more class(es) too" if len(emptied) > 1 else ""))
    listing.skipped = len(result.bad)
    listing.notes.append(f"{listing.root}: left out {len(result.bad)} bad file(s) (data.skip_bad_files), "
                         f"the first {scan.first_problem(result).split(';')[0]}")
    if not listing.count("train"):
        raise DataError(f"{listing.root}: every training image is bad")
    return listing
