"""Keras callbacks for cross-cutting work: pictures at the end of training, throughput, epoch
times, the NaN guard, the run's status file and the batch-norm statistics at the end."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from tfkd import io


class ReconstructionPlot(keras.callbacks.Callback):
    """At the end of training, saves test images over their reconstructions as a PNG.

    ``images`` are uint8 pixels; ``normalize`` maps them to the model's input and
    ``mean``/``std`` map the reconstruction back to pixels.
    """

    def __init__(self, images: np.ndarray, mean: np.ndarray, std: np.ndarray,
                 path: str | Path) -> None:
        super().__init__()
        self.images, self.mean, self.std, self.path = images, mean, std, Path(path)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        normalized = (self.images.astype(np.float32) - self.mean) / self.std
        reconstruction = self.model(normalized, training=False)["reconstruction"]
        pixels = np.clip(np.asarray(reconstruction) * self.std + self.mean, 0, 255).astype(np.uint8)
        save_image_grid([self.images, pixels], ["input", "reconstruction"], self.path)


def save_image_grid(rows: list[np.ndarray], labels: list[str], path: str | Path) -> None:
    """Saves rows of uint8 images (one row per array) as a PNG, atomically."""
    from matplotlib.figure import Figure  # not pyplot: leaves the user's backend (notebooks) alone

    count = len(rows[0])
    fig = Figure(figsize=(1.2 * count, 1.3 * len(rows)))
    axes = fig.subplots(len(rows), count, squeeze=False)
    for r, (row, label) in enumerate(zip(rows, labels)):
        for c in range(count):
            axes[r, c].imshow(row[c])
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


class PreciseBatchNorm(keras.callbacks.Callback):
    """At the end of training, re-estimates the batch-norm moving statistics of ``target`` (the
    model the stage keeps: the teacher, or the distiller's student) on training images
    (``tfkd.models.batchnorm``). It runs before the callbacks after it in the list (pictures of
    the trained model) and before the stage's final evaluation.

    ``images()`` returns the uint8 training images (evaluation geometry); ``normalize`` maps a
    batch of them to the model's input. ``record`` says what was done: the layers re-estimated,
    the images used, and the validation top-1 of the last epoch, which used the old statistics.
    """

    def __init__(self, target: Any, images: Any, batch_size: int, normalize: Any) -> None:
        super().__init__()
        self.target, self.images, self.batch_size, self.normalize = target, images, batch_size, normalize
        self.record: dict[str, Any] = {}

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        from tfkd.models import batchnorm

        images = self.images()
        layers = batchnorm.recalibrate(self.target, batchnorm.image_batches(images, self.batch_size,
                                                                            self.normalize))
        before = (logs or {}).get("val_accuracy")
        self.record = {"layers": layers, "images": int(len(images)), "batch_size": self.batch_size,
                       "val_accuracy_before": None if before is None else float(before)}


class TestEveryEpoch(keras.callbacks.Callback):
    """Evaluates the model on ``dataset`` (the test split) after every epoch and adds its metrics
    to the epoch's logs as ``test_<metric>``, so the CSV log and the history hold them (list it
    before the ``CSVLogger``). The published tables that report a best epoch select on these."""

    def __init__(self, dataset: Any) -> None:
        super().__init__()
        self.dataset = dataset

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            results = self.model.evaluate(self.dataset, verbose=0, return_dict=True)
            logs.update({f"test_{key}": float(value) for key, value in results.items()})


def best_epoch(csv_log: Path, key: str = "test_accuracy") -> dict[str, Any] | None:
    """The epoch (0-based, as logged) with the highest ``key`` in a ``CSVLogger`` file, across
    resumes (a re-logged epoch counts once, its last row): ``{"epoch", key}``, or None."""
    import csv

    if not Path(csv_log).is_file():
        return None
    by_epoch: dict[int, float] = {}
    with open(csv_log, newline="") as f:
        for row in csv.DictReader(f):
            try:
                by_epoch[int(row["epoch"])] = float(row[key])
            except (KeyError, TypeError, ValueError):
                continue
    if not by_epoch:
        return None
    epoch = max(sorted(by_epoch), key=lambda e: by_epoch[e])
    return {"epoch": epoch, key: by_epoch[epoch]}


class ThroughputMeter(keras.callbacks.Callback):
    """Measures training images per second, excluding validation and the first epoch
    (which includes graph tracing) whenever there is more than one epoch."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seconds: list[float] = []
        self.batches: list[int] = []

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._start, self._count, self._stop = time.perf_counter(), 0, None

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._count += 1

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self._stop is None:
            self._stop = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.seconds.append((self._stop or time.perf_counter()) - self._start)
        self.batches.append(self._count)

    @property
    def images_per_second(self) -> float | None:
        """Steady-state training throughput over the measured epochs."""
        if not self.seconds:
            return None
        seconds, batches = (self.seconds[1:], self.batches[1:]) if len(self.seconds) > 1 else (
            self.seconds, self.batches)
        return sum(batches) * self.batch_size / max(sum(seconds), 1e-9)


class EpochClock(keras.callbacks.Callback):
    """Keeps each epoch's wall time (training and validation) in a JSON file of the run folder,
    so a run resumed after it was killed still knows how long its epochs took in all. An epoch
    trained again after a resume replaces its earlier record; the part of an epoch lost to a kill
    is not counted."""

    now = staticmethod(time.perf_counter)

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.seconds: list[float | None] = []

    def recorded(self) -> list[float | None]:
        """Seconds of each epoch in the file (None: an epoch whose time was not recorded, e.g.
        trained before this file was kept)."""
        return list(json.loads(self.path.read_text()).get("epoch_seconds", [])) if self.path.exists() else []

    @property
    def total(self) -> float:
        """Seconds of the recorded epochs, summed."""
        return float(sum(s for s in self.recorded() if s is not None))

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.seconds = self.recorded()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._start = self.now()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.seconds = self.seconds[:epoch] + [None] * (epoch - len(self.seconds))
        self.seconds.append(self.now() - self._start)
        io.write_json(self.path, {"epoch_seconds": self.seconds})


class NanGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss with a message naming the epoch and step.

    It raises ``TrainingError`` from inside ``fit`` so that no later callback runs: unlike
    ``keras.callbacks.TerminateOnNaN`` (which lets the epoch end), ``BackupAndRestore`` never
    saves the broken weights and its last backup, from the last good epoch, is kept.
    """

    def __init__(self, stage: str, backup: str | Path) -> None:
        super().__init__()
        self.stage, self.backup, self._epoch = stage, Path(backup), 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            from tfkd.errors import TrainingError

            kept = (f"the last good backup (end of epoch {self._epoch}) is kept in {self.backup}"
                    if self._epoch else "no epoch had finished, so there is no backup")
            raise TrainingError(f"{self.stage}: the loss became {float(loss)} in epoch "
                                f"{self._epoch + 1}, step {batch + 1}; {kept}; lower the learning "
                                "rate and re-run")


class RunStatus(keras.callbacks.Callback):
    """Keeps ``status.json`` in the run folder up to date: stage, phase (train, validate) and
    epoch, written atomically, for people and tools watching a long run."""

    def __init__(self, path: str | Path, stage: str, epochs: int) -> None:
        super().__init__()
        self.path, self.stage, self.epochs, self._epoch = Path(path), stage, epochs, 0

    def write(self, phase: str) -> None:
        """Records ``phase`` of the current epoch."""
        io.write_json(self.path, {"stage": self.stage, "phase": phase, "epoch": self._epoch + 1,
                                  "epochs": self.epochs, "time": time.time()})

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch
        self.write("train")

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.write("validate")


@keras.saving.register_keras_serializable(package="tfkd")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A learning rate (a schedule or a number) times ``scale``, and 0 for the first
    ``frozen_steps`` steps (a fine-tuned backbone's rate)."""

    def __init__(self, base: Any, scale: float = 1.0, frozen_steps: int = 0) -> None:
        self.base, self.scale, self.frozen_steps = base, float(scale), int(frozen_steps)

    def __call__(self, step: Any) -> Any:
        from keras import ops

        base = self.base(step) if callable(self.base) else self.base
        return ops.where(ops.greater_equal(step, self.frozen_steps), ops.cast(base, "float32") * self.scale, 0.0)

    def get_config(self) -> dict[str, Any]:
        base = keras.saving.serialize_keras_object(self.base) if callable(self.base) else self.base
        return {"base": base, "scale": self.scale, "frozen_steps": self.frozen_steps}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ScaledSchedule":
        config = dict(config)
        if isinstance(config["base"], dict):
            config["base"] = keras.saving.deserialize_keras_object(config["base"])
        return cls(**config)


def skip_epochs(dataset: Any, epochs: int) -> None:
    """Makes and drops the iterators ``fit`` makes over ``dataset`` in ``epochs`` epochs, so its
    reshuffling continues where an uninterrupted run's would be. Keras 3.15's epoch iterator
    makes one at an epoch's start and, when the dataset's length is known, one more as its
    batches run out (``TFEpochIterator``; the resume test in ``test_reliability`` fails if that
    changes). Making an iterator reads no element."""
    known = int(dataset.cardinality()) >= 0
    for _ in range((2 if known else 1) * epochs):
        iter(dataset)


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """``keras.callbacks.BackupAndRestore`` whose backup files are written atomically.

    Keras writes the weights and the epoch counter in place (with an optional copy of the
    previous ones), so a kill during a save can leave a truncated file, or new weights beside an
    old epoch counter. Here each file is written to a temporary name and renamed, weights first
    and the counter last: a reader sees the previous backup or the new one, whole. (Relies on the
    callback's private paths and counters, checked against the pinned Keras 3.15.)

    ``restore_from``: the backup folder to resume from, when it is not the one this process
    writes. Multi-worker tasks other than the chief write to scratch folders of their own but
    resume from the chief's backup, so every worker starts at the same epoch with the same
    weights even when one of them was killed between the last step of an epoch and its backup.

    ``train_data``: the ``tf.data.Dataset`` given to ``fit``. A dataset that reshuffles on each
    iteration draws each new iterator's order from a seed generator that lives in the dataset,
    so a run resumed at epoch k would start again from the first epoch's order. On resume it is
    advanced past the iterators the first k epochs made (``skip_epochs``): a resumed run sees
    the batches the uninterrupted one saw, and ends with the same weights.
    """

    def __init__(self, backup_dir: str, *args: Any, restore_from: str | None = None,
                 train_data: Any = None, **kwargs: Any) -> None:
        super().__init__(backup_dir, *args, **kwargs)
        self._restore_from = restore_from
        self._train_data = train_data

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        super().on_train_begin(logs)
        resumed_at = getattr(self.model, "_initial_epoch", None) or 0
        if self._train_data is not None and resumed_at:
            skip_epochs(self._train_data, resumed_at)

    def _load_model(self) -> None:
        if self._restore_from is None:
            return super()._load_model()
        own = self._weights_path, self._training_metadata_path
        self._weights_path = str(Path(self._restore_from) / Path(own[0]).name)
        self._training_metadata_path = str(Path(self._restore_from) / Path(own[1]).name)
        try:
            return super()._load_model()
        finally:
            self._weights_path, self._training_metadata_path = own

    def _save_model(self) -> None:
        Path(self.backup_dir).mkdir(parents=True, exist_ok=True)
        with io.atomic_path(self._weights_path) as tmp:
            self.model.save_weights(str(tmp), overwrite=True)
        io.write_json(self._training_metadata_path,
                      {"epoch": self._current_epoch, "batch": self._last_batch_seen})
