"""Shared fixtures. Two logical CPU devices are configured before TensorFlow starts, so the
distribution tests can compare MirroredStrategy over two replicas with one device."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

REPO = Path(__file__).resolve().parents[1]


def differing_weights(model, reference) -> list[str]:
    """The paths of ``model``'s weights that are not bit for bit ``reference``'s (every one,
    if the two do not have the same weight shapes, in order)."""
    import numpy as np

    if [w.shape for w in model.weights] != [r.shape for r in reference.weights]:
        return [w.path for w in model.weights] or ["(no weights)"]
    return [w.path for w, r in zip(model.weights, reference.weights)
            if not np.array_equal(np.asarray(w), np.asarray(r))]


def fake_cifar(folder: Path, labels=None, n: int = 20) -> Path:
    """Writes a tiny CIFAR-10 in the canonical python-batch layout (random pixels); returns it."""
    import pickle

    import numpy as np

    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (n, 3072)).astype(np.uint8),
                 b"labels": list(labels if labels is not None else rng.integers(0, 10, n))}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}))
    return folder


def fake_cifar100(folder: Path, train: int = 30, test: int = 10) -> Path:
    """Writes a tiny CIFAR-100 in the canonical python layout (random pixels, ``train``/``test``
    images, labels cycling over the 100 classes); returns it."""
    import pickle

    import numpy as np

    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", train), ("test", test)):
        batch = {b"data": rng.integers(0, 255, (n, 3072)).astype(np.uint8),
                 b"fine_labels": [i % 100 for i in range(n)], b"coarse_labels": [0] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"c%d" % i for i in range(100)]}))
    return folder


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """The canonical CIFAR-10 python batches from TFKD_CIFAR10_DIR.

    Skipped when unset; under CI=true a missing folder is a failure, not a skip.
    """
    value = os.environ.get("TFKD_CIFAR10_DIR")
    in_ci = os.environ.get("CI", "").lower() == "true"
    if not value or not Path(value, "data_batch_1").is_file():
        message = f"TFKD_CIFAR10_DIR={value!r} does not hold the CIFAR-10 python batches"
        if in_ci:
            pytest.fail(message)
        pytest.skip(message)
    return Path(value)


@pytest.fixture(scope="session")
def teachers_dir() -> Path:
    """The public PyTorch CIFAR-10 teachers from TFKD_TEACHERS_DIR (default: ``teachers`` beside
    the TFKD_CIFAR10_DIR folder, as in the shared data folder). Skipped when absent; under
    CI=true a missing folder is a failure, not a skip."""
    value = os.environ.get("TFKD_TEACHERS_DIR") or (
        str(Path(os.environ["TFKD_CIFAR10_DIR"]).parent / "teachers") if os.environ.get("TFKD_CIFAR10_DIR") else "")
    if not value or not Path(value, "resnet20.npz").is_file():
        message = f"TFKD_TEACHERS_DIR={value!r} does not hold resnet20.npz"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return Path(value)


@pytest.fixture(scope="session")
def digits():
    """The digits dataset, prepared once per session."""
    from tfkd import data

    return data.prepare("digits", validation_fraction=0.1, seed=0)


@pytest.fixture(scope="session")
def two_replicas() -> tf.distribute.MirroredStrategy:
    """One MirroredStrategy over the two logical CPUs for the whole session.

    Every MirroredStrategy object numbers its collective ops from the same start, so two of
    them in one process can collide ("Shape mismatch in the collective instance"); sharing one
    avoids that.
    """
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(scope="session")
def one_step():
    """``one_step(strategy, build, weights, x, y)``: builds a compiled model with ``build()``
    inside ``strategy``'s scope, loads ``weights``, fits one global batch ``(x, y)``; returns
    the logged history and the weights after the step."""

    def run(strategy, build, weights, x, y):
        with strategy.scope():
            model = build()
            model.set_weights(weights)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(len(y))
        history = model.fit(ds, epochs=1, verbose=0, shuffle=False).history
        return history, [w.numpy() for w in model.weights]

    return run


def write_student_run(run_dir, student, data, optimizer, epochs):
    """Trains ``student`` on ``data`` with cross-entropy and writes ``run_dir`` as tfkd.train
    writes a student run (student.keras, dataset.json, config.yaml, metrics.json)."""
    import keras

    from tfkd import config, io

    trainer = keras.Model(student.input, student.output["logits"])
    trainer.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    trainer.fit(data.train_dataset(64), epochs=epochs, verbose=0)
    student.save(run_dir / "student.keras")
    io.write_json(run_dir / "dataset.json", data.info())
    io.write_text(run_dir / "config.yaml", config.to_yaml(config.load()))
    io.write_json(run_dir / "metrics.json", {"method": "student", "test_accuracy": 0.5, "stages": {}})
    return run_dir


@pytest.fixture(scope="session")
def student_run(tmp_path_factory, digits):
    """A run folder with a briefly trained resnet8 student on digits, as tfkd.train writes it."""
    import keras

    from tfkd import models

    keras.utils.set_random_seed(0)
    return write_student_run(tmp_path_factory.mktemp("student_run"), models.get("resnet8", 10), digits,
                             keras.optimizers.SGD(0.05, momentum=0.9), epochs=3)


@pytest.fixture(scope="session")
def exported(tmp_path_factory, student_run, digits):
    """Every export format of ``student_run``, verified on 120 test images."""
    from tfkd import export

    out = tmp_path_factory.mktemp("exported") / "artifacts"
    card = export.export(student_run / "student.keras", out, max_test_images=120, latency_runs=5,
                         data=digits)
    return out, card


#: The suite's longest tests, longest first (the order of `--durations` in the full run of
#: 2026-12-05), started first: pytest-xdist hands out tests in collection order (groups of several
#: tests before single ones), so a long test collected last runs alone at the end while the other
#: core idles. An unlisted test keeps its place after these.
LONGEST_FIRST = (
    "test_every_readme_command_runs_as_written[bench]",
    "test_runs_killed_at_three_points_resume_to_the_uninterrupted_result",
    "test_every_readme_command_runs_as_written[main]",
    "test_cifar100_standard_smoke_runs_every_pair_with_the_recipe_and_prints_the_published_table",
    "test_every_readme_command_runs_as_written[yours]",
    "test_compress_rebuilds_a_keras_applications_student_and_quantizes_it",
    "test_multiworker_training_survives_a_killed_worker",
    "test_deploy_trains_exports_times_and_reports_then_caches",
    "test_notebook_runs_every_cell[03_your_own_model.ipynb]",
    "test_deterministic_runs_write_identical_metrics",
    "test_multiworker_distillation_on_two_local_workers",
    "test_tiny_protocol_runs_caches_and_continues_after_interruption",
    "test_the_newest_logit_methods_run_through_the_cli",
    "test_every_readme_command_runs_as_written[mktn]",
    "test_a_mobilenetv3_trained_a_few_hundred_steps_works_after_the_stage",
)


def pytest_collection_modifyitems(config, items):
    """Longest tests first (``LONGEST_FIRST``); the rest in their collected order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.name, len(rank)))
