"""Datasets in, ``tf.data`` pipelines out.

``load(cfg.data, seed)`` (or ``prepare(name, ...)``) gives a ``Data`` (``tfkd.data.base``):

- sources (``sources``, ``tfds_source``): ``cifar10``/``cifar100`` (python batches, or TFDS),
  ``digits`` (bundled), ``folder:PATH`` (a class folder per class, with or without train/test
  split folders; every file header-scanned before training), ``tfds:NAME`` (any TFDS image
  classification dataset, prepared offline in ``data.data_dir``);
- a validation split carved from training (stratified, seeded) unless the source has one;
- a pipeline: in memory (``memory``: arrays, the fastest for CIFAR-sized data) or streamed
  (``streaming``: files decoded batch by batch) for what does not fit (``data.pipeline``); both
  give a decoded file's pixels the same geometry with one resize (``memory``'s docstring);
- the geometry (``transforms``): up to 64 px the CIFAR recipe (stretch, pad-and-crop, flip),
  above it the ImageNet one (random-resized crop + flip; resize and centre crop to evaluate);
- the normalization: per-channel mean/std of the training split (exact in memory, estimated
  from a sample when streamed).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from tfkd.data.base import Data
from tfkd.data.memory import ArrayData
from tfkd.data.sources import (CIFAR_FILES, IMAGE_SUFFIXES, FileList, Source, check_files,
                               list_folder, load_cifar_batches, load_digits, load_tfds_cifar)
from tfkd.data.transforms import PAD, Geometry, augment_batch
from tfkd.errors import DataError

__all__ = ["Data", "ArrayData", "Source", "Geometry", "load", "prepare", "load_source",
           "load_cifar_batches", "augment_batch", "geometry_of", "IMAGE_SUFFIXES", "PAD"]


def _note(message: str) -> None:
    print(f"tfkd: note: {message}", flush=True)


def geometry_of(cfg: Any) -> Geometry:
    """The geometry a ``DataConfig`` asks for."""
    hflip = (cfg.dataset != "digits") if cfg.hflip is None else bool(cfg.hflip)
    return Geometry(int(cfg.image_size), float(cfg.crop_fraction), float(cfg.crop_scale_min), hflip)


# ------------------------------------------------------------------------------- splits
def _subset_indices(labels: np.ndarray, subset: float, seed: int, classes: int, dataset: str,
                    split: str) -> np.ndarray:
    """The stratified, seeded ``subset`` of a split's positions (all of them at 1)."""
    from sklearn.model_selection import train_test_split

    if subset >= 1.0:
        return np.arange(len(labels))
    if round(subset * len(labels)) < classes:
        raise DataError(f"{dataset}: data.subset={subset} keeps {round(subset * len(labels))} of "
                        f"{len(labels)} {split} images, fewer than its {classes} classes: "
                        f"raise data.subset to at least {classes / len(labels):.3g}")
    kept, _ = train_test_split(np.arange(len(labels)), train_size=subset, stratify=labels, random_state=seed)
    return np.asarray(kept)


def _validation_indices(labels: np.ndarray, fraction: float, seed: int, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """(training positions, validation positions): a seeded ``fraction`` held out, stratified
    whenever every class can be on both sides."""
    from sklearn.model_selection import train_test_split

    everything = np.arange(len(labels))
    if fraction <= 0:
        return everything, everything[:0]
    held_out = int(np.ceil(fraction * len(labels)))
    if held_out < 1 or len(labels) - held_out < 1:
        raise DataError(f"{dataset}: data.validation_fraction={fraction} of {len(labels)} "
                        "training images leaves an empty training or validation split")
    counts = np.bincount(labels)
    present = len(counts[counts > 0])
    stratify = labels if counts[counts > 0].min() >= 2 and held_out >= present \
        and len(labels) - held_out >= present else None
    train, val = train_test_split(everything, test_size=fraction, stratify=stratify, random_state=seed)
    return np.asarray(train), np.asarray(val)


# ------------------------------------------------------------------------------- loading
def load_source(dataset: str, data_dir: Optional[str] = None, image_size: int = 32) -> Source:
    """The decoded arrays of a dataset (a folder: each image as the model's evaluation input at
    ``image_size``, ``memory.store_bytes``); ``load`` is what training uses."""
    if dataset in CIFAR_FILES:
        return load_cifar_batches(dataset, data_dir) if data_dir else load_tfds_cifar(dataset)
    if dataset == "digits":
        return load_digits()
    if dataset.startswith("folder:"):
        from tfkd.data.memory import decode_records
        from tfkd.data.streaming import FileRecords

        listing = check_files(list_folder(dataset[len("folder:"):]), False)
        records = FileRecords(listing.paths, listing.labels)
        geometry = Geometry(image_size)
        train = decode_records(records, "train", geometry, dataset)
        test = decode_records(records, "test", geometry, dataset)
        return Source(*train, *test, listing.class_names)
    raise DataError(f"unknown dataset {dataset!r}: expected cifar10, cifar100, digits, folder:PATH "
                    "or tfds:NAME")


def _arrays_data(cfg: Any, seed: int, geometry: Geometry) -> ArrayData:
    """CIFAR and digits: decoded arrays at their own size, in memory."""
    from tfkd.data.memory import array_inputs_statistics

    source = load_source(cfg.dataset, cfg.data_dir, cfg.image_size)
    classes = len(source.class_names)
    train = _subset_indices(source.train_labels, cfg.subset, seed, classes, cfg.dataset, "training")
    test = _subset_indices(source.test_labels, cfg.subset, seed, classes, cfg.dataset, "test")
    xtr, ytr = source.train_images[train], source.train_labels[train]
    xte, yte = source.test_images[test], source.test_labels[test]
    keep, val = _validation_indices(ytr, cfg.validation_fraction, seed, cfg.dataset)
    xval, yval = xtr[val], ytr[val]
    xtr, ytr = xtr[keep], ytr[keep]
    mean, std = array_inputs_statistics(xtr, geometry, cfg.stats_images)
    return ArrayData(cfg.dataset, xtr, ytr, xval, yval, xte, yte, source.class_names, mean, std, geometry)


def _folder_records(cfg: Any, seed: int) -> tuple[Any, list[str], int, list[str]]:
    """A folder's files after the scan, the subset and the validation carve."""
    from tfkd.data.streaming import FileRecords

    listing: FileList = check_files(list_folder(cfg.dataset[len("folder:"):], cfg.test_fraction),
                                    cfg.skip_bad_files)
    classes = len(listing.class_names)
    paths, labels = {}, {}
    for split in listing.paths:
        kept = _subset_indices(listing.labels[split], cfg.subset if split != "val" else 1.0, seed,
                               classes, cfg.dataset, "training" if split == "train" else split)
        paths[split] = [listing.paths[split][i] for i in kept]
        labels[split] = listing.labels[split][kept]
    if "val" not in paths:
        keep, val = _validation_indices(labels["train"], cfg.validation_fraction, seed, cfg.dataset)
        paths["val"], labels["val"] = [paths["train"][i] for i in val], labels["train"][val]
        paths["train"], labels["train"] = [paths["train"][i] for i in keep], labels["train"][keep]
    elif cfg.validation_fraction > 0:
        listing.notes.append(f"{listing.root}: its own validation folder is the validation split "
                             "(data.validation_fraction is not used)")
    return FileRecords(paths, labels), listing.class_names, listing.skipped, listing.notes


def _choose_pipeline(cfg: Any, records: Any, geometry: Geometry) -> str:
    from tfkd.data.memory import estimated_bytes

    if cfg.pipeline != "auto":
        return cfg.pipeline
    images = sum(records.count(s) for s in ("train", "val", "test"))
    held, how = estimated_bytes(records, geometry)
    megabytes = held / 2**20
    if megabytes <= cfg.in_memory_mb:
        return "memory"
    _note(f"{cfg.dataset}: {images} images take {megabytes:,.0f} MB in memory ({how}), over "
          f"data.in_memory_mb={cfg.in_memory_mb}: streaming them (data.pipeline)")
    return "streaming"


def load(cfg: Any, seed: int = 0) -> Data:
    """The dataset a ``DataConfig`` section describes, with its splits, normalization and
    pipelines (see the module docstring)."""
    geometry = geometry_of(cfg)
    dataset = cfg.dataset
    if dataset in CIFAR_FILES or dataset == "digits":
        if cfg.pipeline == "streaming":
            _note(f"{dataset} is read whole into memory (its files are arrays, not images to "
                  "stream); data.pipeline=streaming applies to folder: and tfds: datasets")
        return _arrays_data(cfg, seed, geometry)
    if dataset.startswith("folder:"):
        records, class_names, skipped, notes = _folder_records(cfg, seed)
    elif dataset.startswith("tfds:"):
        from tfkd.data.tfds_source import TfdsRecords

        records = TfdsRecords(dataset[len("tfds:"):].strip(), cfg.data_dir, cfg.validation_fraction,
                              cfg.test_fraction, cfg.subset)
        class_names, skipped, notes = records.class_names, 0, records.notes
    else:
        raise DataError(f"unknown dataset {dataset!r}: expected cifar10, cifar100, digits, "
                        "folder:PATH or tfds:NAME")
    for message in notes:
        _note(message)
    if len(class_names) < 2:
        raise DataError(f"{dataset}: {len(class_names)} class; a classifier needs at least two")
    if _choose_pipeline(cfg, records, geometry) == "streaming":
        from tfkd.data.streaming import StreamData

        return StreamData(dataset, records, class_names, geometry, stats_images=cfg.stats_images,
                          seed=seed, skipped_files=skipped)
    from tfkd.data.memory import array_inputs_statistics, decode_records, decode_training

    # above 64 px: validation and test held as their evaluation inputs, training images once each
    # with their aspect ratio (tfkd.data.memory)
    arrays = {split: decode_records(records, split, geometry, dataset) for split in ("val", "test")}
    arrays["train"] = decode_records(records, "train", geometry, dataset) if geometry.small \
        else decode_training(records, geometry, dataset)
    mean, std = array_inputs_statistics(arrays["train"][0], geometry, cfg.stats_images)
    return ArrayData(dataset, *arrays["train"], *arrays["val"], *arrays["test"], class_names, mean, std,
                     geometry, skipped_files=skipped, eval_inputs=not geometry.small)


def prepare(dataset: str, data_dir: Optional[str] = None, image_size: int = 32,
            validation_fraction: float = 0.1, seed: int = 0, hflip: Optional[bool] = None,
            subset: float = 1.0, **options: Any) -> Data:
    """``load`` with the data options spelled out (the rest of ``DataConfig`` as keywords)."""
    from tfkd.config import DataConfig

    cfg = DataConfig(dataset=dataset, data_dir=data_dir, image_size=image_size,
                     validation_fraction=validation_fraction, hflip=hflip, subset=subset, **options)
    return load(cfg, seed)

