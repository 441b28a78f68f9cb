"""Reliability: NaN guard, repeatable runs, run status, kills at three points of a run."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import differing_weights, fake_cifar
import tensorflow as tf

from tfkd import callbacks, train
from tfkd.errors import TrainingError

pytestmark = pytest.mark.xdist_group("reliability")  # module fixtures: built once, on one worker

FAST = ["--teacher-model", "resnet8", "--batch-size", "64", "--set", "progress=0"]


def run_cli(*args, timeout=300):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "tfkd.train", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


class ExplodingRate(keras.optimizers.schedules.LearningRateSchedule):
    """A sane rate, then an absurd one from ``step`` on: the loss stops being finite."""

    def __init__(self, step):
        self.step = step

    def __call__(self, step):
        return tf.where(step >= self.step, 1e30, 0.01)

    def get_config(self):
        return {"step": self.step}


def test_nan_guard_names_epoch_and_step_and_keeps_the_last_good_backup(tmp_path):
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(40, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    def build():
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                 keras.layers.Dense(2)])

    model = build()
    model.compile(keras.optimizers.SGD(ExplodingRate(7)),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    backup = tmp_path / "backup"
    cbs = [keras.callbacks.BackupAndRestore(str(backup)), callbacks.NanGuard("teacher", backup)]
    with pytest.raises(TrainingError) as error:  # 5 steps per epoch: breaks in epoch 2
        model.fit(x, y, batch_size=8, epochs=5, callbacks=cbs, verbose=0, shuffle=False)
    message = str(error.value)
    assert "in epoch 2, step" in message and "end of epoch 1" in message and "\n" not in message
    step = int(message.split("step ")[1].split(";")[0])
    assert 3 <= step <= 5  # rate jumps at global step 7 (epoch 2, step 3); loss breaks at once or next
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 1  # epochs done
    restored = build()
    restored.load_weights(str(backup / "latest.weights.h5"))
    assert all(np.isfinite(w).all() for w in restored.get_weights())


@pytest.mark.parametrize("length", ["known", "unknown"])
def test_a_resumed_fit_sees_the_uninterrupted_fits_batches(tmp_path, length):
    """fit for 3 epochs, against fit for 2 and then a new model and dataset (as a new process
    makes them) resumed from that backup: the same weights to the bit, with a reshuffling
    dataset of known or unknown length (Keras makes two iterators an epoch over the first and
    one over the second: skip_epochs)."""
    x = np.random.default_rng(0).normal(size=(48, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")

    def dataset():
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(48, seed=1, reshuffle_each_iteration=True)
        if length == "unknown":
            ds = ds.filter(lambda a, b: tf.reduce_all(tf.math.is_finite(a)))
        ds = ds.batch(8, drop_remainder=True)
        assert (int(ds.cardinality()) >= 0) == (length == "known")
        return ds

    def fit(epochs, backup):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(2)])
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        ds = dataset()
        model.fit(ds, epochs=epochs, verbose=0, shuffle=False,
                  callbacks=[callbacks.AtomicBackupAndRestore(str(backup), delete_checkpoint=False,
                                                              train_data=ds)])
        return model.get_weights()

    uninterrupted = fit(3, tmp_path / "a")
    fit(2, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "training_metadata.json").read_text())["epoch"] == 2
    resumed = fit(3, tmp_path / "b")
    assert all(np.array_equal(a, b) for a, b in zip(uninterrupted, resumed))
    ds = dataset()  # skipping two epochs moves a new dataset off the first epoch's order
    first = [b.numpy().tolist() for _, b in iter(ds)]
    callbacks.skip_epochs(ds, 2)
    assert [b.numpy().tolist() for _, b in iter(ds)] != first


def test_nan_loss_in_a_real_run_exits_5_with_epoch_and_step(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("--stage", "teacher", "--run-dir", str(run_dir), "--epochs", "2", *FAST,
                     "--set", "teacher.optimizer.learning_rate=1e12")
    assert result.returncode == 5, result.stderr[-1500:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tfkd: error: teacher: the loss became") and "in epoch 1, step" in last
    assert "Traceback" not in result.stderr
    assert not (run_dir / "teacher.keras").exists()


def _metrics_without_timing(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text().replace(str(run_dir), "RUN"))

    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items()
                if k not in ("wall_seconds", "epochs_seconds", "train_images_per_second")}
    return strip(metrics)


@pytest.mark.xdist_group("reliability-deterministic")  # long, needs no module fixture: its own unit
def test_deterministic_runs_write_identical_metrics(tmp_path):
    args = ["--stage", "all", "--method", "cft", "--epochs", "2", "--seed", "3", "--deterministic",
            *FAST, "--set", "export.formats=[fp32]", "--set", "export.max_test_images=50",
            "--set", "data.validation_fraction=0.2"]
    first = run_cli("--run-dir", str(tmp_path / "a"), *args)
    second = run_cli("--run-dir", str(tmp_path / "b"), *args)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-1500:]
    a, b = _metrics_without_timing(tmp_path / "a"), _metrics_without_timing(tmp_path / "b")
    assert a["stages"]["teacher"]["test_accuracy"] > 0.1
    for stage in ("teacher", "distill"):
        for key in ("val_accuracy", "test_accuracy", "test_loss"):
            assert a["stages"][stage][key] == b["stages"][stage][key], (stage, key)
    a["stages"].pop("export"), b["stages"].pop("export")  # holds latencies
    a.pop("export"), b.pop("export")
    assert a == b


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("teacher")
    assert train.main(["--stage", "teacher", "--run-dir", str(run_dir), "--epochs", "3", *FAST]) == 0
    return run_dir / "teacher.keras"


def _distill_args(run_dir, teacher):
    return ["--stage", "distill", "--method", "cft", "--teacher", str(teacher), "--student-model",
            "resnet8", "--epochs", "5", "--run-dir", str(run_dir), *FAST]


def _read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _kill_at(args, run_dir, point):
    """Starts the run and SIGKILLs it at ``point``: mid-epoch, just after an epoch's backup, or
    during the final evaluation. Returns what status.json said at the kill."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "tfkd.train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metadata = run_dir / "backup" / "distill" / "training_metadata.json"
    deadline, seen = time.time() + 300, {}
    while time.time() < deadline and proc.poll() is None:
        seen = _read_json(run_dir / "status.json")
        if point == "epoch" and seen.get("phase") == "train" and seen.get("epoch", 0) >= 3:
            time.sleep(0.3)  # into the epoch's batches
            break
        if point == "checkpoint" and _read_json(metadata).get("epoch", 0) >= 2:
            break
        if point == "evaluate" and seen.get("phase") == "evaluate":
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed at {point}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return seen


def _check_run_dir(run_dir):
    """Every file of a finished run is complete: JSON/YAML/CSV parse, the model loads."""
    import yaml

    assert not [p for p in run_dir.rglob(".tmp-*")], "a temporary file was left behind"
    assert not (run_dir / "backup").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert json.loads((run_dir / "status.json").read_text())["phase"] == "done"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["student"]["epochs"] == 5
    json.loads((run_dir / "dataset.json").read_text())
    with open(run_dir / "distill_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["val_accuracy"]) >= 0 for r in rows)
    student = keras.saving.load_model(run_dir / "student.keras", safe_mode=True)
    return metrics, rows, student


@pytest.mark.xdist_group("reliability-kills")  # long; the only user of digits_teacher
def test_runs_killed_at_three_points_resume_to_the_uninterrupted_result(tmp_path, digits_teacher):
    reference_dir = tmp_path / "reference"
    assert run_cli(*_distill_args(reference_dir, digits_teacher)).returncode == 0
    reference, _, reference_student = _check_run_dir(reference_dir)
    outcomes = {}
    for point in ("epoch", "checkpoint", "evaluate"):
        run_dir = tmp_path / point
        args = _distill_args(run_dir, digits_teacher)
        at_kill = _kill_at(args, run_dir, point)
        assert not (run_dir / "student.keras").exists()
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr[-1500:]
        metrics, rows, student = _check_run_dir(run_dir)
        epochs = [int(r["epoch"]) for r in rows]
        assert metrics["epochs"] == 5 and epochs[-1] == 4 and sorted(set(epochs)) == [0, 1, 2, 3, 4]
        assert len(epochs) <= 6  # at most the killed epoch is logged twice: resumed, not restarted
        seconds = json.loads((run_dir / "distill_seconds.json").read_text())["epoch_seconds"]
        assert len(seconds) == 5 and all(s > 0 for s in seconds)  # every epoch timed, across the kill
        assert metrics["epochs_seconds"] == pytest.approx(sum(seconds))
        outcomes[point] = (at_kill, metrics["epochs_run_here"], metrics["test_accuracy"])
        if point == "evaluate":
            assert metrics["epochs_run_here"] == 0  # training had finished: only evaluation re-ran
        # Resumed from its backup, with the input order replayed (skip_epochs), the run ends
        # with the uninterrupted run's weights, to the bit.
        different = differing_weights(student, reference_student)
        assert not different, (point, at_kill, different[:5])
        assert metrics["test_accuracy"] == reference["test_accuracy"], outcomes
    print("reference", reference["test_accuracy"], "outcomes", outcomes)


def _image_folder(root, broken=None):
    from PIL import Image

    for split in ("train", "test"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    if broken:
        (root / "train" / "a" / broken[0]).write_bytes(broken[1])
    return root


def _truncated(root):
    folder = fake_cifar(root / "c")
    (folder / "data_batch_2").write_bytes((folder / "data_batch_2").read_bytes()[:500])
    return ["--dataset", "cifar10", "--data-dir", str(folder)]


BROKEN_JPEG = b"\xff\xd8\xff\xe0 cut short"
#: Hostile inputs to python -m tfkd.train: (case, arguments made in tmp_path, exit code, message).
HOSTILE_TRAIN = [
    ("missing data dir", lambda d: ["--dataset", "cifar10", "--data-dir", str(d / "nope")], 3,
     "nope: data directory not found"),
    ("empty data dir", lambda d: (d / "empty").mkdir() or ["--dataset", "cifar10", "--data-dir", str(d / "empty")],
     3, "missing CIFAR batch file"),
    ("empty data path", lambda d: ["--dataset", "cifar10", "--data-dir", ""], 2,
     "option 'data.data_dir' = ''"),
    ("empty run dir", lambda d: ["--run-dir", " "], 2, "option 'run_dir'"),
    ("truncated CIFAR batch", _truncated, 3, "data_batch_2: unreadable CIFAR batch file"),
    ("labels out of range", lambda d: ["--dataset", "cifar10", "--data-dir", str(fake_cifar(d / "c", [10] * 20))],
     3, "labels must be in 0..9"),
    ("corrupt PNG", lambda d: ["--dataset", f"folder:{_image_folder(d / 'f', ('x.png', b'junk'))}"], 3,
     "x.png: unreadable image"),
    ("corrupt JPEG", lambda d: ["--dataset", "folder:" + str(_image_folder(d / "f", ("x.jpg", BROKEN_JPEG)))],
     3, "x.jpg: unreadable image"),
    ("missing image folder", lambda d: ["--dataset", f"folder:{d / 'none'}"], 3, "image folder not found"),
    ("unknown config key", lambda d: ["--set", "teacher.epoch=3"], 2, "key 'teacher.epoch'"),
    ("mistyped config value", lambda d: ["--set", "data.batch_size=zero"], 2, "--set data.batch_size=zero"),
    ("negative epochs", lambda d: ["--epochs", "-2"], 2, "option 'teacher.epochs' = -2"),
    ("NaN learning rate", lambda d: ["--set", "student.optimizer.learning_rate=nan"], 2,
     "student.optimizer.learning_rate"),
    ("config file not YAML", lambda d: (d / "c.yaml").write_text("a: [1,") and ["--config", str(d / "c.yaml")], 2,
     "not valid YAML"),
    ("config file a list", lambda d: (d / "c.yaml").write_text("[1, 2]") and ["--config", str(d / "c.yaml")], 2,
     "expected a mapping"),
    ("unknown method", lambda d: ["--method", "magic"], 2, "option 'distill.method' = 'magic'"),
]


@pytest.mark.parametrize("case,make,code,match", HOSTILE_TRAIN, ids=[c[0] for c in HOSTILE_TRAIN])
def test_hostile_train_inputs_exit_with_one_line_and_write_nothing(tmp_path, capsys, case, make, code, match):
    run_dir = tmp_path / "run"
    args = make(tmp_path)
    if "--run-dir" not in args:
        args = ["--run-dir", str(run_dir), *args]
    assert train.main([*args, "--epochs", "1", *FAST] if "--epochs" not in args else [*args, *FAST]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("tfkd: error: ") and match in err and "\n" not in err, err
    assert not run_dir.exists()


def test_hostile_export_inputs(tmp_path, capsys):
    from tfkd import export, models
    from tfkd.teacher import ReconstructionTeacher

    ReconstructionTeacher(models.get("resnet8", 10)).save(tmp_path / "teacher.keras")
    (tmp_path / "junk.keras").write_bytes(b"junk")
    cases = [(tmp_path / "teacher.keras", "this is a teacher"), (tmp_path / "junk.keras", "damaged or not a .keras file"),
             (tmp_path / "none.keras", "not found")]
    for source, match in cases:
        assert export.main([str(source), "--out", str(tmp_path / "out")]) == 4
        err = capsys.readouterr().err.strip()
        assert err.startswith("tfkd: error: ") and match in err and "\n" not in err, err
        assert not (tmp_path / "out").exists()


def test_model_files_with_code_are_refused(tmp_path, capsys):
    """A .keras file holding a Lambda layer (Python code) is refused by Keras's safe mode, both
    as a teacher and as a model to export (without safe mode it would load)."""
    from tfkd import export

    inputs = keras.Input((32, 32, 3))
    lam = keras.layers.Lambda(lambda x: x * 2.0)(inputs)
    keras.Model(inputs, {"logits": keras.layers.Dense(10)(keras.layers.Flatten()(lam))}).save(
        tmp_path / "lambda.keras")
    assert keras.saving.load_model(tmp_path / "lambda.keras", safe_mode=False) is not None
    run_dir = tmp_path / "run"
    code = train.main(["--stage", "distill", "--teacher", str(tmp_path / "lambda.keras"), "--run-dir",
                       str(run_dir), "--epochs", "1", *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 4 and "lambda.keras: not a loadable Keras model" in err and "\n" not in err
    assert export.main([str(tmp_path / "lambda.keras"), "--out", str(tmp_path / "out")]) == 4
    assert "not a loadable Keras model" in capsys.readouterr().err
    assert not (run_dir / "student.keras").exists() and not (tmp_path / "out").exists()


def test_epoch_clock_keeps_each_epoch_once_across_a_resume(tmp_path):
    now = iter([0.0, 10.0, 10.0, 30.0, 30.0, 60.0,  # epochs 0-2 of the first process: 10, 20, 30 s
                100.0, 125.0, 125.0, 165.0,  # resumed at epoch 2 (the epoch lost to a kill): 25, 40 s
                200.0, 205.0])
    for epochs in ((0, 1, 2), (2, 3), (0,)):  # a process each: the first, its resume, a restart
        clock = callbacks.EpochClock(tmp_path / "distill_seconds.json")
        clock.now = lambda: next(now)
        clock.on_train_begin()
        for epoch in epochs:
            clock.on_epoch_begin(epoch)
            clock.on_epoch_end(epoch)
        if epochs == (2, 3):
            assert clock.recorded() == [10.0, 20.0, 25.0, 40.0] and clock.total == 95.0
    assert clock.recorded() == [5.0]  # a restart from scratch forgets the old epochs


def test_backup_is_replaced_whole_or_not_at_all(tmp_path):
    """A save that dies half-way leaves the previous backup intact and loadable."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    backup = tmp_path / "backup"
    model.fit(x, y, epochs=2, verbose=0, callbacks=[callbacks.AtomicBackupAndRestore(str(backup),
                                                                                    delete_checkpoint=False)])
    saved = (backup / "latest.weights.h5").read_bytes()
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 2

    def dies_half_way(filepath, overwrite=True):
        Path(filepath).write_bytes(saved[: len(saved) // 2])
        raise KeyboardInterrupt("killed mid-write")

    model.save_weights = dies_half_way
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, epochs=4, verbose=0, callbacks=[callbacks.AtomicBackupAndRestore(
            str(backup), delete_checkpoint=False)])
    assert (backup / "latest.weights.h5").read_bytes() == saved
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 2
    assert not list(backup.glob(".tmp-*"))


def test_a_worker_resumes_from_the_chiefs_backup_not_its_own(tmp_path):
    """A non-chief worker killed between an epoch's last step and its own backup is an epoch
    behind the chief: on restart it must take the chief's epoch and weights, or the workers'
    collectives pair up wrongly (seen: 'Collective instance ... expected data_type 1 got 9')."""
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")

    def model():
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        m.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return m

    chief, worker = tmp_path / "backup", tmp_path / ".workers" / "worker-1" / "backup"
    for folder, epochs in ((chief, 3), (worker, 2)):
        keras.utils.set_random_seed(epochs)
        m = model()
        m.fit(x, y, epochs=epochs, verbose=0,
              callbacks=[callbacks.AtomicBackupAndRestore(str(folder), delete_checkpoint=False)])
    m = model()
    m.load_weights(chief / "latest.weights.h5")
    chief_weights = [w.numpy() for w in m.weights]
    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.setdefault("epoch", epoch)
            seen.setdefault("weights", [w.numpy() for w in self.model.weights])

    resumed = model()
    resumed.fit(x, y, epochs=5, verbose=0, callbacks=[
        callbacks.AtomicBackupAndRestore(str(worker), delete_checkpoint=False, restore_from=str(chief)),
        Probe()])
    assert seen["epoch"] == 3
    assert all(np.array_equal(a, b) for a, b in zip(seen["weights"], chief_weights))
    assert json.loads((worker / "training_metadata.json").read_text())["epoch"] == 5  # writes its own
    assert json.loads((chief / "training_metadata.json").read_text())["epoch"] == 3


def test_an_interrupt_swallowed_on_its_way_up_still_exits_130_and_publishes_nothing(tmp_path, capsys):
    """Python ignores an exception raised in ``__del__`` (where a garbage-collected TensorFlow
    function may be when Ctrl-C lands): the command still exits 130 and nothing is published."""
    from tfkd import cli, export

    staged, out = tmp_path / "staged", tmp_path / "out"
    staged.mkdir()
    (staged / "model.tflite").write_bytes(b"new")

    def body():
        cli._RECEIVED.append(signal.SIGINT)  # what the handler records before raising
        export.publish(staged, out)
        return 0

    assert cli.run(body, interrupted="interrupted; nothing was written") == 130
    assert capsys.readouterr().err.strip() == "tfkd: interrupted; nothing was written"
    assert not out.exists() and (staged / "model.tflite").read_bytes() == b"new"
    assert cli.run(lambda: (cli._RECEIVED.append(signal.SIGTERM), 0)[1]) == 130
    assert cli.run(lambda: 0) == 0  # a new command starts with no interrupt on record


def test_taking_a_run_folders_lock_removes_what_a_killed_process_half_wrote(tmp_path):
    """A SIGKILL during an atomic write leaves ``.tmp-<pid>-NAME``; the next run clears it."""
    from tfkd import rundir

    (tmp_path / ".tmp-7695-status.json").write_text("{")
    (tmp_path / "backup" / ".tmp-12-student.keras").mkdir(parents=True)
    (tmp_path / "backup" / ".tmp-12-student.keras" / "part").write_text("x")
    (tmp_path / ".tmp-notes.txt").write_text("the user's")  # not tfkd's pattern: kept
    lock = rundir.RunLock(tmp_path).acquire()
    try:
        left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob(".tmp-*"))
        assert left == [".tmp-notes.txt"]
        assert (tmp_path / "backup").is_dir()
    finally:
        lock.release()
