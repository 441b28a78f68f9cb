"""``tfds:NAME``: any TensorFlow Datasets image-classification dataset, read with its splits.

The dataset is read from ``data.data_dir`` (TFDS's own default folder when unset), prepared
there beforehand; an unprepared one is downloaded when the machine can (TFDS's own code), and
otherwise the error names what to fetch and where to put it. Images stay encoded in the records
(``tfds.decode.SkipDecoding``) so the pipelines crop before they decode.

Splits: ``test`` is the dataset's ``test`` split, else its ``validation`` split, else the last
``data.test_fraction`` of ``train``. Validation is the dataset's ``validation`` split when it
also has a ``test`` split, else the last ``data.validation_fraction`` of what remains of
``train`` (TFDS writes its records shuffled, so a contiguous slice is a fair sample).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import tensorflow as tf

from tfkd.data.streaming import Records
from tfkd.errors import DataError

PREFIX = "tfds:"


def _builder(name: str, data_dir: Optional[str]) -> Any:
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import downloader

    kwargs = {"data_dir": data_dir} if data_dir else {}
    try:
        builder = tfds.builder(name, **kwargs)
    except Exception as error:  # noqa: BLE001 - TFDS raises its own kinds
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"tfds:{name}: {first} (TensorFlow Datasets names: tfds.list_builders(); "
                        f"a dataset of your own: prepare it in data.data_dir)") from None
    _keys(builder, name)  # a dataset without images is refused before anything is downloaded
    if builder.is_prepared():
        return builder
    where = data_dir or "TensorFlow Datasets' folder (~/tensorflow_datasets)"
    root = Path(builder.data_dir_root)
    made = [root, root / name, root / "downloads", root / "downloads" / name, root / "downloads" / "extracted",
            root / "downloads" / "manual"]
    existed = {path for path in made if path.exists()}
    retries = downloader.MAX_RETRIES
    downloader.MAX_RETRIES = 1
    try:
        builder.download_and_prepare()
        return builder
    except Exception as error:  # noqa: BLE001 - offline, or files that must be fetched by hand
        for path in reversed(made):  # what the failed download created, nothing that was there
            if path not in existed:
                shutil.rmtree(path, ignore_errors=True)
        manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
        how = (f"put the files its TFDS page names in {where}/downloads/manual" if manual else
               f"on a machine with internet access run tfds.builder('{name}').download_and_prepare() "
               f"and copy its {name}/ folder into {where}")
        raise DataError(f"tfds:{name}: not prepared in {where} and it could not be downloaded "
                        f"({type(error).__name__}); {how}, or set data.data_dir to where it is") from None
    finally:
        downloader.MAX_RETRIES = retries


def _keys(builder: Any, name: str) -> tuple[str, str]:
    """(image feature, label feature) of an image-classification dataset."""
    import tensorflow_datasets as tfds

    features = builder.info.features
    if not any(isinstance(f, tfds.features.Image) for f in features.values()):
        raise DataError(f"tfds:{name}: has no images (features: {', '.join(sorted(features.keys()))}); "
                        "tfkd trains image classifiers: expected an Image and a ClassLabel feature")
    keys = builder.info.supervised_keys
    if keys and len(keys) == 2 and isinstance(keys[0], str) and isinstance(keys[1], str):
        image_key, label_key = keys
    else:
        images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
        labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
        if not images or not labels:
            raise DataError(f"tfds:{name}: not an image-classification dataset (features "
                            f"{sorted(features.keys())}: expected an Image and a ClassLabel)")
        image_key, label_key = images[0], labels[0]
    if not isinstance(features[image_key], tfds.features.Image) or \
            not isinstance(features[label_key], tfds.features.ClassLabel):
        raise DataError(f"tfds:{name}: its supervised keys {keys} are not an image and a class label")
    return image_key, label_key


class TfdsRecords(Records):
    """The splits of a prepared TFDS dataset as encoded-image records (see the module docstring)."""

    is_path = False

    def __init__(self, name: str, data_dir: Optional[str], validation_fraction: float,
                 test_fraction: float, subset: float = 1.0) -> None:
        self.name = name
        self.builder = _builder(name, data_dir)
        self.image_key, self.label_key = _keys(self.builder, name)
        self.class_names = list(self.builder.info.features[self.label_key].names)
        self.notes: list[str] = []
        self.specs = self._splits(validation_fraction, test_fraction, subset)
        self._labels: dict[str, np.ndarray] = {}

    def _splits(self, validation_fraction: float, test_fraction: float, subset: float) -> dict[str, tuple[str, int]]:
        """split -> (TFDS split string, examples)."""
        available = {k: int(v.num_examples) for k, v in self.builder.info.splits.items()}
        if "train" not in available:
            raise DataError(f"tfds:{self.name}: no 'train' split (it has {sorted(available)})")
        train = available["train"]
        specs: dict[str, tuple[str, int]] = {}
        if "test" in available or "validation" in available:
            test = "test" if "test" in available else "validation"
            specs["test"] = (test, available[test])
            if test == "test" and "validation" in available:
                specs["val"] = ("validation", available["validation"])
        else:
            held = int(round(test_fraction * train))
            specs["test"] = (f"train[{train - held}:]", held)
            train -= held
            self.notes.append(f"tfds:{self.name} has no test split: the last {held} of its training "
                              "examples are the test split (data.test_fraction)")
        if "val" not in specs:
            held = int(round(validation_fraction * train))
            if held:
                specs["val"] = (f"train[{train - held}:{train}]", held)
            train -= held
        if subset < 1.0:
            for split, (spec, n) in list(specs.items()):
                keep = max(1, int(round(subset * n)))
                base, _, window = spec.partition("[")
                start = int(window.split(":")[0] or 0) if window else 0
                specs[split] = (f"{base}[{start}:{start + keep}]", keep)
            train = max(1, int(round(subset * train)))
        specs["train"] = (f"train[:{train}]", train)
        return specs

    def count(self, split: str) -> int:
        return self.specs[split][1] if split in self.specs else 0

    def _read(self, split: str, image: bool = True) -> tf.data.Dataset:
        import tensorflow_datasets as tfds

        decoders = {self.image_key: tfds.decode.SkipDecoding()}
        ds = self.builder.as_dataset(self.specs[split][0], decoders=decoders, shuffle_files=False,
                                     read_config=tfds.ReadConfig(try_autocache=False))
        image_key, label_key = self.image_key, self.label_key
        return ds.map(lambda e: (e[image_key] if image else tf.constant(b""), tf.cast(e[label_key], tf.int32)))

    def elements(self, split: str) -> tf.data.Dataset:
        if split not in self.specs:
            return tf.data.Dataset.from_tensor_slices((tf.constant([], tf.string), tf.constant([], tf.int32),
                                                       tf.constant([], tf.int32)))
        return self._read(split).enumerate().map(lambda i, e: (e[0], e[1], tf.cast(i, tf.int32)))

    def labels(self, split: str) -> np.ndarray:
        if split not in self.specs:
            return np.zeros((0,), np.int32)
        if split not in self._labels:  # one pass over the records' labels
            found = [y.numpy() for _, y in self._read(split, image=False).batch(4096)]
            self._labels[split] = np.concatenate(found).astype(np.int32) if found else np.zeros((0,), np.int32)
        return self._labels[split]

    def indices(self, split: str, chosen: np.ndarray) -> tf.data.Dataset:
        """The first ``len(chosen)`` records (TFDS records are written shuffled: a fair sample
        that does not read the whole split)."""
        return self.elements(split).take(len(chosen))
