"""Hostile input to every command: one message line naming the problem, the documented exit
code, no traceback, and no file of the user's deleted or changed.

Each case runs in a folder of its own (``user``), which holds files the user owns; the folder's
listing and checksums are compared before and after. Cases that fail before TensorFlow loads run
as real processes; the others run in this process (TensorFlow is loaded already).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fake_cifar

from tfkd import bench, export, train

pytestmark = pytest.mark.xdist_group("hostile")  # module fixtures: built once, on one worker

REPO = Path(__file__).resolve().parents[1]
FAST = ["--teacher-model", "resnet8", "--student-model", "resnet8", "--batch-size", "64",
        "--set", "progress=0"]
EXPORT_FAST = ["--set", "export.formats=[fp32]", "--set", "export.max_test_images=40",
               "--set", "export.representative=20"]
EXPORT_ARGS = ["--formats", "fp32", "--max-test-images", "40", "--latency-runs", "1"]  # tfkd.export's own


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> SHA-256), folders as ``<dir>``."""
    listing = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        listing[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return listing


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A digits run folder as ``python -m tfkd.train`` leaves it: teacher, cft student, export."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert train.main(["--run-dir", str(run_dir), "--epochs", "1", *FAST, *EXPORT_FAST]) == 0
    return run_dir


def _user_files(folder: Path) -> None:
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "photos").mkdir()
    (folder / "photos" / "cat.png").write_bytes(b"\x89PNG not really")


def _copy_run(run: Path, user: Path) -> Path:
    target = user / "run"
    shutil.copytree(run, target)
    return target


def _image_folder(root: Path, classes=("a", "b"), nested: bool = False) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for label in classes:
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((32, 32, 3), 30 * i + 10, np.uint8)).save(folder / f"{i}.png")
            if nested:
                (folder / "more").mkdir()
                Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(folder / "more" / "x.png")
    return root


def _bad_class(user: Path, split: str, skip: bool = True, layout: str = "split") -> list[str]:
    """A folder dataset whose class 'b' has only bad files in ``split`` (or, without split
    folders, everywhere)."""
    if layout == "split":
        root = _image_folder(user / "f")
        bad = (root / split / "b").glob("*.png")
    else:
        root = user / "f"
        for label in ("a", "b"):
            (root / label).mkdir(parents=True)
            for i in range(10):
                _png(root / label / f"{i}.png", np.full((32, 32, 3), 20 * i, np.uint8))
        bad = (root / "b").glob("*.png")
    for path in bad:
        path.write_bytes(b"not an image")
    return ["--dataset", f"folder:{root}", *(["--set", "data.skip_bad_files=true"] if skip else []),
            "--set", "data.validation_fraction=0"]


def _class_named(user: Path, name) -> list[str]:
    """A folder dataset with classes 'a' and ``name`` (str, or bytes for a name that is not UTF-8)."""
    root = _image_folder(user / "f")
    for split in ("train", "test"):
        target = os.path.join(os.fsencode(root / split), name) if isinstance(name, bytes) else root / split / name
        os.rename(root / split / "b", target)
    return ["--dataset", f"folder:{root}"]


def _long_name(user: Path) -> list[str]:
    return ["--run-dir", str(user / ("r" * 300))]


def _read_only(user: Path) -> list[str]:
    if os.geteuid() == 0:  # root writes through mode bits: use a folder the kernel refuses
        return ["--run-dir", "/sys/kernel/tfkd-run"]
    folder = user / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return ["--run-dir", str(folder / "run")]


def _write(user: Path, name: str, data: bytes) -> str:
    (user / name).write_bytes(data)
    return str(user / name)


# (case, command, arguments made in the user's folder, exit code, message) for real processes:
# all of them fail before TensorFlow is imported.
PROCESS_CASES = [
    ("train: unknown key", "tfkd.train", lambda u, r: ["--set", "teacher.epoch=3"], 2, "key 'teacher.epoch'"),
    ("train: absurd epochs", "tfkd.train", lambda u, r: ["--epochs", "1000000000"], 2,
     "option 'teacher.epochs' = 1000000000: expected an integer from 1 to 100000"),
    ("train: zero epochs flag", "tfkd.train", lambda u, r: ["--epochs", "0"], 2,
     "option 'teacher.epochs' = 0: expected an integer from 1"),
    ("train: negative seed flag", "tfkd.train", lambda u, r: ["--seed", "-1"], 2, "option 'seed' = -1"),
    ("train: epochs not a number", "tfkd.train", lambda u, r: ["--epochs", "many"], 2,
     "--epochs: invalid int value: 'many'"),
    ("train: negative seed key", "tfkd.train", lambda u, r: ["--set", "seed=-3"], 2, "option 'seed' = -3"),
    ("train: infinite rate", "tfkd.train", lambda u, r: ["--set", "student.optimizer.learning_rate=inf"], 2,
     "student.optimizer.learning_rate"),
    ("train: binary config", "tfkd.train", lambda u, r: ["--config", _write(u, "c.yaml", bytes(range(256)))], 2,
     "c.yaml: not a text file"),
    ("train: UTF-16 config with a bad key", "tfkd.train",
     lambda u, r: ["--config", _write(u, "c.yaml", "teacher:\n  epoch: 3\n".encode("utf-16"))], 2,
     "key 'teacher.epoch'"),
    ("train: config is a folder", "tfkd.train", lambda u, r: ["--config", str(u / "photos")], 2,
     "photos: is a folder, expected a YAML file"),
    ("train: run dir is a file", "tfkd.train", lambda u, r: ["--run-dir", str(u / "notes.txt")], 2,
     "notes.txt is a file, not a folder"),
    ("train: run dir under a file", "tfkd.train", lambda u, r: ["--run-dir", str(u / "notes.txt" / "run")], 2,
     "notes.txt is a file, not a folder"),
    ("train: run dir name too long", "tfkd.train", lambda u, r: _long_name(u), 2, "longer than the file system allows"),
    ("train: renamed key keeps working but a bad value fails", "tfkd.train",
     lambda u, r: ["--set", "verbose=7"], 2, "option 'progress' = 7"),
    ("export: out is a folder of the user's", "tfkd.export", lambda u, r: [str(r), "--out", str(u / "photos")], 2,
     "not empty and not a tfkd export"),
    ("export: out is the current folder", "tfkd.export", lambda u, r: [str(r), "--out", "."], 2,
     "holds the model being exported"),
    ("export: out is the run folder", "tfkd.export", lambda u, r: [str(r), "--out", str(r)], 2,
     "holds the model being exported"),
    ("export: out is a file", "tfkd.export", lambda u, r: [str(r), "--out", str(u / "notes.txt")], 2,
     "notes.txt is a file, not a folder"),
    ("export: bad format", "tfkd.export", lambda u, r: [str(r), "--out", str(u / "o"), "--formats", "fp32,tiff"], 2,
     "--formats fp32,tiff: expected some of"),
    ("export: bad tolerance", "tfkd.export", lambda u, r: [str(r), "--out", str(u / "o"), "--tolerance", "-1"], 2,
     "--tolerance: -1: expected a finite number > 0"),
    ("export: bad opset", "tfkd.export", lambda u, r: [str(r), "--out", str(u / "o"), "--opset", "99"], 2,
     "--opset 99: expected an ONNX opset"),
    ("compress: zero batch", "tfkd.compress", lambda u, r: [str(r), "--out", str(u / "o"), "--batch-size", "0"], 2,
     "--batch-size: 0: expected an integer >= 1"),
    ("compress: out is a folder of the user's", "tfkd.compress", lambda u, r: [str(r), "--out", str(u / "photos")],
     2, "not empty and not a tfkd export"),
    ("compress: sparsity", "tfkd.compress", lambda u, r: [str(r), "--out", str(u / "o"), "--sparsity", "1.5"], 2,
     "--sparsity 1.5"),
    ("bench: zero epochs", "tfkd.bench", lambda u, r: ["accuracy", "--epochs", "0", "--out", str(u / "b")], 2,
     "--epochs: 0"),
    ("bench: typo in a run name", "tfkd.bench", lambda u, r: ["accuracy", "--only", "kdd", "--out", str(u / "b")], 2,
     "--only kdd: not a run of cifar10-cpu"),
    ("bench: negative seed", "tfkd.bench", lambda u, r: ["accuracy", "--seeds", "-1", "--out", str(u / "b")], 2,
     "--seeds: -1"),
    ("bench: zero steps", "tfkd.bench", lambda u, r: ["speed", "--steps", "0"], 2, "--steps: 0"),
    ("bench: unknown method", "tfkd.bench", lambda u, r: ["speed", "--methods", "kd", "magic"], 2,
     "--methods magic"),
    ("bench: protocol is a folder", "tfkd.bench", lambda u, r: ["accuracy", "--protocol", str(u / "photos")], 2,
     "not a file nor a shipped protocol"),
]


@pytest.mark.parametrize("case,command,make,code,match", PROCESS_CASES, ids=[c[0] for c in PROCESS_CASES])
def test_hostile_input_to_a_command_process(tmp_path, finished_run, case, command, make, code, match):
    user = tmp_path / "user"
    user.mkdir()
    _user_files(user)
    run = _copy_run(finished_run, user)
    args = make(user, run)
    if command == "tfkd.train" and "--run-dir" not in args:
        args = ["--run-dir", str(user / "new-run"), *args]
    before = snapshot(user)
    probe = ("import runpy, sys; sys.argv = [sys.argv[0], *sys.argv[1:]]\n"
             "try:\n    runpy.run_module(%r, run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    print('TF_LOADED' if 'tensorflow' in sys.modules else 'TF_NOT_LOADED', file=sys.stderr)\n"
             "    raise\n" % command)
    result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True,
                            timeout=120, cwd=user, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, result.stderr[-1500:]
    assert lines[-1] == "TF_NOT_LOADED", "the option was checked after TensorFlow loaded"
    assert len(lines) == 2 and lines[0].startswith("tfkd: error: ") and match in lines[0], lines
    assert snapshot(user) == before


def _fake_cifar_args(user: Path, run: Path) -> list[str]:
    return ["--dataset", "cifar10", "--data-dir", str(fake_cifar(user / "cifar", n=40))]


def _live_lock(user: Path, run: Path) -> list[str]:
    import socket

    (run / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                           "command": "python -m tfkd.train (the other one)"}))
    return ["--run-dir", str(run), "--epochs", "1"]


def _corrupt(name: str, data: bytes):
    def make(user: Path, run: Path) -> list[str]:
        (run / name).write_bytes(data)
        return [str(run), "--out", str(user / "o")]
    return make


def _teacher_of_digits_for_fake_cifar(user: Path, run: Path) -> list[str]:
    return ["--stage", "distill", "--method", "kd", "--teacher", str(run / "student.keras"),
            *_fake_cifar_args(user, run), "--run-dir", str(user / "new-run"), "--set", "data.validation_fraction=0"]


# (case, command, arguments, exit code, message) run in this process (they need TensorFlow).
IN_PROCESS_CASES = [
    ("train: rerun with another method", train.main,
     lambda u, r: ["--run-dir", str(r), "--epochs", "1", "--method", "kd"], 2,
     "student.keras was made with other settings (distill.method: 'cft' there, 'kd' now"),
    ("train: rerun with another teacher loss", train.main,
     lambda u, r: ["--run-dir", str(r), "--epochs", "1", "--stage", "teacher", "--set", "teacher.lambda_rec=0.5"], 2,
     "teacher.keras was made with other settings (teacher.lambda_rec: 1.0 there, 0.5 now)"),
    ("train: rerun with more epochs", train.main,
     lambda u, r: ["--run-dir", str(r), "--epochs", "2"], 2, "teacher.epochs: 1 there, 2 now"),
    ("train: rerun on another dataset", train.main,
     lambda u, r: ["--run-dir", str(r), "--epochs", "1", *_fake_cifar_args(u, r)], 2,
     "holds a run on another dataset (dataset 'digits' there, 'cifar10' now"),
    ("train: rerun on another dataset, even with --retrain", train.main,
     lambda u, r: ["--run-dir", str(r), "--epochs", "1", "--retrain", *_fake_cifar_args(u, r)], 2,
     "holds a run on another dataset"),
    ("train: a folder in use by a live process", train.main, _live_lock, 2,
     "in use by another tfkd process (pid"),
    ("train: damaged run record", train.main,
     lambda u, r: [_write(r, "run.json", b"{not json"), "--run-dir", str(r), "--epochs", "1"][1:], 2,
     "run.json: damaged run record"),
    ("train: one-class folder dataset", train.main,
     lambda u, r: ["--dataset", f"folder:{_image_folder(u / 'f', classes=('only',))}"], 3,
     "one class folder (only); a classifier needs at least two"),
    ("train: skipping bad files would leave a class without training images", train.main,
     lambda u, r: _bad_class(u, "train"), 3,
     "data.skip_bad_files would leave class 'b' with no training images (every one of them is bad, such as "),
    ("train: skipping bad files would leave a class without test images", train.main,
     lambda u, r: _bad_class(u, "test"), 3, "data.skip_bad_files would leave class 'b' with no test images"),
    ("train: skipping bad files would empty a class of a folder without splits", train.main,
     lambda u, r: _bad_class(u, "", layout="flat"), 3,
     "data.skip_bad_files would leave class 'b' with no training images"),
    ("train: a class of bad files, not skipped", train.main, lambda u, r: _bad_class(u, "train", skip=False), 3,
     "unreadable image (not an image); 3 more bad file(s) (data.skip_bad_files=true leaves bad files out)"),
    ("train: a class name with a newline", train.main, lambda u, r: _class_named(u, "b\nc"), 3,
     "/train/b\\nc': a class folder name with a line break ('\\n') cannot be one line of labels.txt; rename the folder"),
    ("train: a class name with a carriage return", train.main, lambda u, r: _class_named(u, "b\rc"), 3,
     "a class folder name with a line break ('\\r') cannot be one line of labels.txt"),
    ("train: a class name with a Unicode line separator", train.main, lambda u, r: _class_named(u, "b\u2028c"), 3,
     "a class folder name with a line break ('\\u2028')"),
    ("train: a class name that is not UTF-8", train.main, lambda u, r: _class_named(u, b"b\xffc"), 3,
     "a class folder name that is not valid UTF-8 cannot be a line of labels.txt; rename the folder"),
    ("train: subset too small to split", train.main,
     lambda u, r: ["--set", "data.subset=0.001"], 3, "data.subset=0.001 keeps 1 of"),
    ("train: read-only run dir", train.main, lambda u, r: _read_only(u), 2, "run_dir"),
    ("train: digits model as a CIFAR-10 teacher", train.main, _teacher_of_digits_for_fake_cifar, 4,
     "trained on another dataset than this run's cifar10 (dataset 'digits' there"),
    ("export: corrupt dataset.json", export.main, _corrupt("dataset.json", b"{\x00broken"), 4,
     "dataset.json: damaged"),
    ("export: corrupt config.yaml", export.main, _corrupt("config.yaml", b"data: [unclosed\n"), 4,
     "config.yaml: not valid YAML"),
    ("bench: protocol file in UTF-16 with an unknown key", bench.main,
     lambda u, r: ["accuracy", "--report-only", "--out", str(u / "b"), "--protocol",
                   _write(u, "p.yaml", "dataset: digits\ncolour: red\n".encode("utf-16"))], 2,
     "unknown key 'colour'"),
]


@pytest.mark.parametrize("case,main,make,code,match", IN_PROCESS_CASES, ids=[c[0] for c in IN_PROCESS_CASES])
def test_hostile_input_in_process(tmp_path, capsys, finished_run, case, main, make, code, match):
    user = tmp_path / "user"
    user.mkdir()
    _user_files(user)
    run = _copy_run(finished_run, user)
    args = make(user, run)
    args = [*args, *FAST] if main is train.main else args
    before = snapshot(user)
    assert main(args) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("tfkd: error: ") and match in err[0], err
    assert snapshot(user) == before


def test_help_shows_every_default():
    result = subprocess.run([sys.executable, "-m", "tfkd.train", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "MISSING" not in result.stdout and "object at 0x" not in result.stdout
    assert "distill.teachers = []" in result.stdout
    from tfkd.config import EXPORT_FORMATS

    assert f"export.formats = {list(EXPORT_FORMATS)}" in result.stdout
    assert "export.max_drop = 1.0" in result.stdout and "student.precise_bn.enabled = True" in result.stdout


# ----------------------------------------------------------------------------- what must work
def test_export_replaces_only_its_own_files(tmp_path, finished_run, capsys):
    out = tmp_path / "artifacts"
    export.export(finished_run, out, ["fp32", "int8"], max_test_images=40, representative=20, latency_runs=2)
    assert "tfkd: note:" not in capsys.readouterr().out  # a new folder: nothing to say
    (out / "benchmark.json").write_text("{}")  # what export/benchmark.py writes beside a model
    (out / "benchmark.png").write_bytes(b"png")
    (out / "my-notes.txt").write_text("kept\n")
    old_card = (out / "model_card.json").read_bytes()
    card = export.export(finished_run, out, ["fp32"], max_test_images=40, latency_runs=2)
    names = {p.name for p in out.iterdir()}
    assert names == {"model_fp32.tflite", "labels.txt", "model_card.json", "model_card.md",
                     "benchmark.json", "benchmark.png", "my-notes.txt"}  # its old int8 model is gone, the rest stays
    assert (out / "my-notes.txt").read_text() == "kept\n" and (out / "model_card.json").read_bytes() != old_card
    assert (out / "benchmark.json").read_text() == "{}" and (out / "benchmark.png").read_bytes() == b"png"
    assert card[export.MARKER]["files"] == ["labels.txt", "model_card.json", "model_card.md", "model_fp32.tflite"]
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tfkd: note:")]
    assert notes == [f"tfkd: note: {out}: removed 1 file(s) of the previous export that this one does not "
                     "write: model_int8.tflite; kept benchmark.json, benchmark.png, export/benchmark.py's "
                     "timings of the previous files, now stale (run it again); left 1 other file(s) as they "
                     "are: my-notes.txt"]


@pytest.mark.parametrize("first,second,extra,summary", [
    ("fp32,saved_model", "fp32", [], "; removed 1 file(s) of the previous export that this one does not write: "
                                     "saved_model"),
    ("fp32,saved_model", "fp32", ["benchmark.json"], "; removed 1 file(s) of the previous export that this one does "
                                                     "not write: saved_model; kept benchmark.json, stale"),
    ("fp32", "fp32", ["benchmark.json", "benchmark.png", "mine.txt"], "; kept benchmark.json, benchmark.png, stale"),
    ("fp32", "fp32,saved_model", [], ""),
])
def test_a_re_export_says_in_its_summary_what_it_removed_and_kept(tmp_path, finished_run, capsys, first, second,
                                                                   extra, summary):
    out = tmp_path / "artifacts"
    common = [str(finished_run), "--out", str(out), "--max-test-images", "20", "--latency-runs", "1",
              "--max-drop", "none"]
    assert export.main([*common, "--formats", first]) == 0
    for name in extra:
        (out / name).write_text(name)
    capsys.readouterr()
    assert export.main([*common, "--formats", second]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tfkd: exported")]
    assert lines == [f"tfkd: exported {len(second.split(','))} formats to {out}{summary}"]
    assert {p.name for p in out.iterdir()} == {*export.export_files(second.split(",")), *extra}
    for name in extra:
        assert (out / name).read_text() == name  # the user's and the kit's files: untouched


def test_model_card_holds_no_nan():
    card = export.finite({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf"), "e": 2}})
    assert card == {"a": None, "b": [1.0, None], "c": {"d": None, "e": 2}}
    json.dumps(card, allow_nan=False)  # strict JSON


def test_retrain_trains_the_changed_stage_and_what_depends_on_it(tmp_path, finished_run, capsys):
    run = _copy_run(finished_run, tmp_path)
    args = ["--run-dir", str(run), "--epochs", "1", *FAST]
    before = (run / "teacher.keras").read_bytes()
    assert train.main([*args, "--stage", "teacher", "--set", "teacher.lambda_rec=0.5", "--retrain"]) == 0
    out = capsys.readouterr().out
    assert "--retrain: the teacher stage trains again (teacher.lambda_rec: 1.0 there, 0.5 now)" in out
    assert "student.keras was distilled from the previous teacher" in out
    assert (run / "teacher.keras").read_bytes() != before
    record = json.loads((run / "run.json").read_text())["stages"]
    assert record["teacher"]["settings"]["teacher.lambda_rec"] == 0.5 and record["teacher"]["status"] == "done"
    assert "lambda_rec: 0.5" in (run / "config.yaml").read_text()
    # the student was distilled from the old teacher: a distill re-run says so, --retrain redoes it
    assert train.main([*args, "--stage", "distill", "--set", "teacher.lambda_rec=0.5"]) == 2
    assert "distill.teachers: teachers" in capsys.readouterr().err
    assert train.main([*args, "--stage", "distill", "--set", "teacher.lambda_rec=0.5", "--retrain"]) == 0
    config = (run / "config.yaml").read_text()
    assert "lambda_rec: 0.5" in config  # the teacher's settings stay described after a distill run


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, finished_run, capsys):
    import socket

    run = _copy_run(finished_run, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert train.main(["--run-dir", str(run), "--epochs", "1", *FAST, *EXPORT_FAST]) == 0
    assert f"took over the lock of process {dead.pid}" in capsys.readouterr().out
    assert not (run / ".lock").exists()


def test_one_writer_per_folder_an_export_waits_for_no_training_and_cleans_a_killed_exports_leftovers(
        tmp_path, finished_run, capsys):
    """An export of a run folder that a training process holds is refused (it would ship the
    student being replaced); a killed export's temporary folders are removed by the next export
    into the same place; the lock is released after the export."""
    import socket

    from tfkd import export

    run = _copy_run(finished_run, tmp_path)
    training = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = Path(f"/proc/{training.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        (run / ".lock").write_text(json.dumps({"pid": training.pid, "host": socket.gethostname(), "start": start,
                                               "command": "python -m tfkd.train --retrain"}))
        for target in (run, run / "student.keras"):
            assert export.main([str(target), "--out", str(tmp_path / "art"), *EXPORT_ARGS]) == 2
            err = capsys.readouterr().err
            assert f"{run}: in use by another tfkd process (pid {training.pid}, python -m tfkd.train --retrain)" in err
            assert not (tmp_path / "art").exists() and json.loads((run / ".lock").read_text())["pid"] == training.pid
    finally:
        training.kill()
        training.wait()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftovers = [tmp_path / f".tmp-{dead.pid}-art", tmp_path / f".old-{dead.pid}-art"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "model_fp32.tflite").write_bytes(b"half")
    mine = tmp_path / ".tmp-12-notes"  # another name's: not this export's to remove
    mine.mkdir()
    assert export.main([str(run), "--out", str(tmp_path / "art"), *EXPORT_ARGS]) == 0
    out = capsys.readouterr().out
    assert all(f"removed {f}, left by an export that was killed" in out and not f.exists() for f in leftovers)
    assert mine.is_dir() and (tmp_path / "art" / "model_card.json").is_file() and not (run / ".lock").exists()


def test_nested_images_count_and_a_plain_teacher_for_cft_is_noted(tmp_path, finished_run, capsys):
    folder = _image_folder(tmp_path / "f", nested=True)
    args = ["--dataset", f"folder:{folder}", "--epochs", "1", *FAST, "--batch-size", "4",
            "--set", "data.validation_fraction=0"]
    assert train.main(["--stage", "teacher", "--run-dir", str(tmp_path / "t"), *args]) == 0
    out = capsys.readouterr().out
    assert "train: 2 of 10 images are in nested folders of their class folder" in out
    assert train.main(["--stage", "distill", "--method", "cft", "--teacher", str(finished_run / "student.keras"),
                       "--run-dir", str(tmp_path / "s"), "--epochs", "1", *FAST]) == 0
    assert "student.keras was not trained with reconstruction" in capsys.readouterr().out


def _wait_for(predicate, proc, timeout=300):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_ctrl_c_in_training_exits_130_and_the_rerun_continues(tmp_path, finished_run):
    import signal

    run = tmp_path / "run"
    args = [sys.executable, "-m", "tfkd.train", "--stage", "distill", "--method", "kd", "--teacher",
            str(finished_run / "teacher.keras"), "--run-dir", str(run), "--epochs", "5", *FAST]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metadata = run / "backup" / "distill" / "training_metadata.json"

    def two_epochs_backed_up():
        try:
            return json.loads(metadata.read_text())["epoch"] >= 2
        except (OSError, ValueError, KeyError):
            return False

    assert _wait_for(two_epochs_backed_up, proc), "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-1500:]
    assert err.strip().splitlines()[-1] == "tfkd: interrupted; re-run the same command to resume"
    assert "Traceback" not in err and not (run / ".lock").exists() and not (run / "student.keras").exists()
    backed_up = json.loads(metadata.read_text())["epoch"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-1500:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 5 and metrics["epochs_run_here"] == 5 - backed_up
    import csv

    with open(run / "distill_log.csv") as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    assert sorted(set(epochs)) == [0, 1, 2, 3, 4] and epochs[-1] == 4


def test_ctrl_c_during_an_export_leaves_the_previous_one_whole(tmp_path, finished_run):
    import signal

    out = tmp_path / "artifacts"
    export.export(finished_run, out, ["fp32"], max_test_images=40, latency_runs=2, int8_io="uint8")
    card = json.loads((out / "model_card.json").read_text())  # no int8 file: no uint8 model announced
    assert card["int8_io"] is None and "--int8-io" not in (out / "model_card.md").read_text()
    before = snapshot(out)
    proc = subprocess.Popen([sys.executable, "-m", "tfkd.export", str(finished_run), "--out", str(out),
                             "--formats", "fp32,onnx", "--max-test-images", "40"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    converting = lambda: any(tmp_path.glob(f".tmp-{proc.pid}-artifacts/saved_model/*.pb"))  # noqa: E731
    assert _wait_for(converting, proc), "the export ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-1500:]
    assert err.strip().splitlines()[-1] == "tfkd: interrupted; nothing was written" and "Traceback" not in err
    assert snapshot(out) == before and not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))


def test_compress_ends_a_diverged_fine_tune_cleanly(tmp_path, finished_run):
    out = tmp_path / "qat"
    result = subprocess.run([sys.executable, "-m", "tfkd.compress", str(finished_run), "--out", str(out),
                             "--epochs", "1", "--learning-rate", "1e30", "--batch-size", "64",
                             "--max-test-images", "40"], capture_output=True, text=True, timeout=600)
    assert result.returncode in (5, 6), result.stderr[-1500:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tfkd: error: ") and ("loss became" in last or "diverged" in last)
    assert "Traceback" not in result.stderr and not out.exists()


# ----------------------------------------------------------------------------- the export/ kit
KIT = REPO / "export"


def _onnx_model(path: Path, shape: list) -> Path:
    """A tiny ONNX classifier (global average pool + linear, 4 classes) with input ``shape``
    (NCHW; symbolic names for free dimensions)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    channels = shape[1]
    weights = numpy_helper.from_array(np.arange(4 * channels, dtype=np.float32).reshape(channels, 4) / 100, "w")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], [weights])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _onnx_graph(path: Path, inputs: dict, outputs: dict, nodes: list) -> Path:
    """An ONNX model of ``nodes`` (op, inputs, outputs[, attributes]) with ``inputs``/``outputs`` name ->
    (element type, shape), and the weight ``w`` (3 x 4)."""
    import onnx
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node(op, i, o, **(extra[0] if extra else {})) for op, i, o, *extra in nodes], "other",
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in outputs.items()],
        [numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) / 100, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


_F = 1  # onnx.TensorProto.FLOAT
_HEAD = [("GlobalAveragePool", ["x"], ["p"]), ("Flatten", ["p"], ["f"]), ("MatMul", ["f", "w"], ["out"])]
OTHER_MODELS = {
    "two inputs": ({"a": (_F, ["N", 3, 8, 8]), "b": (_F, ["N", 3, 8, 8])}, {"out": (_F, ["N", 4])},
                   [("Add", ["a", "b"], ["x"]), *_HEAD]),
    "two outputs": ({"x": (_F, ["N", 3, 8, 8])}, {"out": (_F, ["N", 4]), "pooled": (_F, ["N", 3, 1, 1])},
                    [*_HEAD, ("Identity", ["p"], ["pooled"])]),
    "a 4-D output": ({"x": (_F, ["N", 3, 8, 8])}, {"p": (_F, ["N", 3, 1, 1])}, _HEAD[:1]),
    "integer input": ({"i": (7, ["N", 3, 8, 8])}, {"out": (_F, ["N", 4])}, [("Cast", ["i"], ["x"], {"to": _F}), *_HEAD]),
}


def _other(user: Path, name: str) -> Path:
    inputs, outputs, nodes = OTHER_MODELS[name]
    return _onnx_graph(user / "other.onnx", inputs, outputs, nodes)


def _png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


def _bomb(path: Path) -> Path:
    """A PNG whose header claims more pixels than Pillow decodes safely (a decompression bomb)."""
    from PIL import Image

    with Image.new("L", (13000, 13000)) as image:  # 169M pixels, over twice Pillow's limit
        image.save(path, optimize=False)
    return path


KIT_CASES = [
    ("predict: negative top", "predict.py", lambda u, m: [m, _png(u / "a.png", np.zeros((8, 8, 3), np.uint8)),
                                                          "--top", "-1"], 2, "--top: -1: expected an integer >= 1"),
    ("predict: labels of the wrong length", "predict.py",
     lambda u, m: [m, _png(u / "a.png", np.zeros((8, 8, 3), np.uint8)), "--labels", _write(u, "l.txt", b"a\nb\n")],
     3, "l.txt: 2 labels for a model with 4 classes"),
    ("predict: a decompression bomb", "predict.py", lambda u, m: [m, _bomb(u / "bomb.png")], 3,
     "bomb.png: image too large to decode safely"),
    ("predict: not an image", "predict.py", lambda u, m: [m, _write(u, "x.png", b"no")], 3, "x.png: not a readable image"),
    ("predict: a camera raw file", "predict.py", lambda u, m: [m, _write(u, "IMG_1.DNG", b"II*\x00 raw")], 3,
     "IMG_1.DNG: camera raw: convert the files to JPEG or PNG"),
    ("predict: a vector drawing", "predict.py", lambda u, m: [m, _write(u, "logo.svg", b"<svg/>")], 3,
     "logo.svg: a vector drawing: convert the files to JPEG or PNG"),
    ("predict: a folder of camera raw files only", "predict.py",
     lambda u, m: [m, (u / "raw").mkdir() or _write(u / "raw", "a.dng", b"II*") and u / "raw"], 3,
     "raw: no images in this folder; 1 .dng file(s) left out (camera raw: convert the files to JPEG or PNG)"),
    ("predict: free image size", "predict.py",
     lambda u, m: [_onnx_model(u / "dyn.onnx", ["N", 3, "H", "W"]), _png(u / "a.png", np.zeros((8, 8, 3), np.uint8))],
     2, "the model takes any image size"),
    ("predict: a grayscale NCHW model", "predict.py",
     lambda u, m: [_onnx_model(u / "gray.onnx", ["N", 1, 8, 8]), _png(u / "a.png", np.zeros((8, 8, 3), np.uint8))],
     4, "gray.onnx: the model takes grayscale (1-channel) images (input 'images', shape [-1, 1, 8, 8]); "
        "the kit feeds 3-channel RGB pixels"),
    ("predict: a grayscale model of any size", "predict.py",
     lambda u, m: [_onnx_model(u / "gray.onnx", ["N", 1, "H", "W"]), _png(u / "a.png", np.zeros((8, 8, 3), np.uint8))],
     4, "the model takes grayscale (1-channel) images"),
    ("benchmark: a grayscale model", "benchmark.py", lambda u, m: [_onnx_model(u / "gray.onnx", ["N", 1, 28, 28])],
     4, "the model takes grayscale (1-channel) images (input 'images', shape [-1, 1, 28, 28])"),
    ("predict: another tool's model with two inputs", "predict.py",
     lambda u, m: [_other(u, "two inputs"), _png(u / "a.png", np.zeros((8, 8, 3), np.uint8))], 4,
     "other.onnx: 2 inputs ('a', 'b') and none named 'images'; the kit runs an image classifier with one "
     "image input ([N, H, W, 3] or [N, 3, H, W] pixels in [0, 255]) and one output of class scores [N, classes]"),
    ("predict: another tool's model with two outputs", "predict.py",
     lambda u, m: [_other(u, "two outputs"), _png(u / "a.png", np.zeros((8, 8, 3), np.uint8))], 4,
     "other.onnx: 2 outputs ('out', 'pooled') and none named 'logits'; the kit runs"),
    ("predict: another tool's model with a 4-D output", "predict.py",
     lambda u, m: [_other(u, "a 4-D output"), _png(u / "a.png", np.zeros((8, 8, 3), np.uint8))], 4,
     "other.onnx: output 'p' has shape ['N', 3, 1, 1], not [N, classes]; the kit runs"),
    ("predict: another tool's model with an integer input", "predict.py",
     lambda u, m: [_other(u, "integer input"), _png(u / "a.png", np.zeros((8, 8, 3), np.uint8))], 4,
     "other.onnx: input 'i' is tensor(int64), not float pixels; the kit runs"),
    ("benchmark: another tool's model with two inputs", "benchmark.py", lambda u, m: [_other(u, "two inputs")], 4,
     "other.onnx: 2 inputs ('a', 'b') and none named 'images'"),
    ("benchmark: zero runs", "benchmark.py", lambda u, m: [m, "--runs", "0"], 2, "--runs: 0: expected an integer >= 1"),
    ("benchmark: negative threads", "benchmark.py", lambda u, m: [m, "--threads", "-2"], 2, "--threads: -2"),
    ("benchmark: missing model", "benchmark.py", lambda u, m: [u / "none.onnx"], 3, "none.onnx: not found"),
]


@pytest.mark.parametrize("case,script,make,code,match", KIT_CASES, ids=[c[0] for c in KIT_CASES])
def test_hostile_input_to_the_kit(tmp_path, case, script, make, code, match):
    user = tmp_path / "user"
    user.mkdir()
    model = _onnx_model(user / "nchw.onnx", ["N", 3, 8, 8])
    args = [str(a) for a in make(user, model)]
    before = snapshot(user)
    result = subprocess.run([sys.executable, str(KIT / script), *args], capture_output=True, text=True,
                            timeout=120, cwd=user)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, result.stderr[-1500:]
    assert len(lines) == 1 and lines[0].startswith(f"{Path(script).stem}: error: ") and match in lines[0], lines
    assert snapshot(user) == before


def test_kit_runs_nchw_and_free_size_models_and_reads_16_bit_pngs_as_training_does(tmp_path):
    from tfkd import data

    rng = np.random.default_rng(0)
    wide = (rng.integers(0, 65536, (8, 8))).astype(np.uint16)
    sixteen = _png(tmp_path / "g16.png", wide)
    eight = _png(tmp_path / "g8.png", np.repeat((wide >> 8).astype(np.uint8)[..., None], 3, -1))
    import tensorflow as tf

    decoded = data.transforms.eval_bytes(tf.io.read_file(str(sixteen)), data.Geometry(8)).numpy()  # what training reads
    np.testing.assert_array_equal(decoded[..., 0], (wide >> 8).astype(np.uint8))
    outputs = {}
    for name, shape, extra in (("nchw", ["N", 3, 8, 8], []), ("free", ["N", 3, "H", "W"], ["--image-size", "8"])):
        model = _onnx_model(tmp_path / f"{name}.onnx", shape)
        result = subprocess.run([sys.executable, str(KIT / "predict.py"), str(model), str(sixteen), str(eight),
                                 "--top", "4", *extra], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.strip().splitlines()
        assert lines[0].split(": ", 1)[1] == lines[1].split(": ", 1)[1]  # 16-bit == its high byte
        outputs[name] = lines[0].split(": ", 1)[1]
    mean = decoded.astype(np.float32).mean(axis=(0, 1))
    logits = mean @ (np.arange(12, dtype=np.float32).reshape(3, 4) / 100)
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    expected = ", ".join(f"{i} {probs[i]:.3f}" for i in np.argsort(probs)[::-1])
    assert outputs["nchw"] == outputs["free"] == expected
