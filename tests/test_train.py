import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from conftest import differing_weights
from PIL import Image

from tfkd import pipeline, train
from tfkd.teacher import ReconstructionTeacher

pytestmark = pytest.mark.xdist_group("train")  # module fixtures: built once, on one worker

FAST = ["--teacher-model", "resnet8", "--batch-size", "64", "--set", "progress=0"]
FAST_EXPORT = ["--set", "export.formats=[fp32,int8]", "--set", "export.max_test_images=60",
               "--set", "export.representative=50"]


def run_cli(*args, timeout=300):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "tfkd.train", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "digits"
    code = train.main(["--stage", "teacher", "--run-dir", str(run_dir), "--epochs", "4", *FAST])
    assert code == 0
    return run_dir


def test_cli_run_on_digits_writes_the_run_directory(digits_run):
    files = {p.name for p in digits_run.iterdir()}
    assert {"config.yaml", "dataset.json", "teacher.keras", "metrics.json", "reconstructions.png",
            "teacher_log.csv", "tensorboard"} <= files
    assert not [p for p in digits_run.rglob(".tmp-*")], "no temporary file is left behind"
    assert not (digits_run / "backup").exists(), "the backup goes once training ends"
    metrics = json.loads((digits_run / "metrics.json").read_text())
    for key in ("val_accuracy", "test_accuracy", "test_psnr", "epochs", "wall_seconds"):
        assert metrics[key] is not None, key
    assert metrics["epochs"] == 4 and metrics["stages"]["teacher"]["test_accuracy"] == metrics["test_accuracy"]
    assert metrics["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
    with open(digits_run / "teacher_log.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2, 3]
    assert list((digits_run / "tensorboard" / "teacher").rglob("events.out.tfevents.*"))
    width, height = Image.open(digits_run / "reconstructions.png").size
    assert width > 400 and height > 100


def test_saved_teacher_reproduces_reported_test_accuracy(digits_run):
    from tfkd import data

    teacher = keras.saving.load_model(digits_run / "teacher.keras", safe_mode=True)
    assert isinstance(teacher, ReconstructionTeacher)
    info = json.loads((digits_run / "dataset.json").read_text())
    prepared = data.prepare("digits")
    np.testing.assert_allclose(prepared.mean, info["mean"], rtol=1e-6)
    logits = teacher.backbone(prepared.normalize(prepared.test_images), training=False)["logits"]
    accuracy = float(np.mean(np.argmax(logits, 1) == prepared.test_labels))
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)


def test_rerun_skips_a_finished_stage(digits_run, capsys):
    before = (digits_run / "teacher.keras").stat().st_mtime_ns
    assert train.main(["--stage", "teacher", "--run-dir", str(digits_run), "--epochs", "4", *FAST]) == 0
    assert "skipping the teacher stage" in capsys.readouterr().out
    assert (digits_run / "teacher.keras").stat().st_mtime_ns == before


@pytest.mark.parametrize("args,code,match", [
    (["--set", "teacher.epoch=3"], 2, "key 'teacher.epoch'"),
    (["--epochs", "-1"], 2, "option 'teacher.epochs' = -1"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], 3, "/nonexistent/cifar: data directory not found"),
    (["--dataset", "folder:/nonexistent/images"], 3, "/nonexistent/images: image folder not found"),
    (["--config", "/nonexistent/c.yaml"], 2, "/nonexistent/c.yaml: not found"),
    (["--teacher-model", "resnet21"], 2, "option 'teacher.model' = 'resnet21'"),
])
def test_errors_are_one_line_with_exit_code_and_leave_nothing(tmp_path, capsys, args, code, match):
    run_dir = tmp_path / "run"
    assert train.main(["--run-dir", str(run_dir), *args]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("tfkd: error: ") and match in err and "\n" not in err
    assert not run_dir.exists()


def test_error_exit_from_a_real_process_has_no_traceback(tmp_path):
    result = run_cli("--run-dir", str(tmp_path / "r"), "--set", "data.batch_size=zero")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("tfkd: error: --set data.batch_size=zero")


def test_help_explains_every_option():
    result = run_cli("--help", timeout=120)
    assert result.returncode == 0
    for text in ("--config", "--stage", "--dataset", "--data-dir", "--teacher-model", "--epochs",
                 "--batch-size", "--run-dir", "--strategy", "--seed", "teacher.lambda_rec",
                 "data.validation_fraction", "Exit codes"):
        assert text in result.stdout, text


def _kill_when_epoch_backed_up(args, backup, min_epoch=2):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "tfkd.train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metadata = backup / "training_metadata.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(metadata.read_text()).get("epoch", 0) >= min_epoch:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("stage", ["teacher"])  # distill: test_reliability kills it at three points
def test_killed_run_resumes_from_its_backup(tmp_path, digits_run, stage):
    """SIGKILL mid-training, re-run the same command: it continues from the last backup."""
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--epochs", "6", *FAST]
    if stage == "distill":
        args += ["--stage", "distill", "--teacher", str(digits_run / "teacher.keras"), "--student-model", "resnet8"]
    else:
        args += ["--stage", "teacher"]
    _kill_when_epoch_backed_up(args, run_dir / "backup" / stage)
    artifact = run_dir / ("student.keras" if stage == "distill" else "teacher.keras")
    assert not artifact.exists()
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 6 and 1 <= metrics["epochs_run_here"] <= 4
    with open(run_dir / f"{stage}_log.csv") as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f)]
    assert epochs[-1] == 5 and len(epochs) < 6 + 2  # resumed, not restarted from epoch 0
    assert keras.saving.load_model(artifact) is not None


def test_distill_stage_writes_the_student_alone(tmp_path, digits_run):
    from tfkd import models

    run_dir = tmp_path / "s"
    code = train.main(["--stage", "distill", "--method", "cft", "--teacher", str(digits_run / "teacher.keras"),
                       "--student-model", "resnet8", "--epochs", "2", "--run-dir", str(run_dir), *FAST])
    assert code == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "cft" and metrics["terms"] == {"ce": 1.0, "kd": 0.9, "feat": 1.0, "adv": 0.1}
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    for key in ("d_real_acc", "d_fake_acc", "d_loss"):
        assert key in metrics
    student = keras.saving.load_model(run_dir / "student.keras", safe_mode=True)
    assert student.count_params() == models.get("resnet8", 10).count_params()
    assert not [l.name for l in student.layers if "adapter" in l.name or "discriminator" in l.name]
    with open(run_dir / "distill_log.csv") as f:
        header = next(csv.reader(f))
    assert {"feat", "adv", "d_real_acc", "d_fake_acc", "val_accuracy"} <= set(header)


@pytest.mark.xdist_group("train-mktn")  # long, needs no module fixture: its own unit
def test_mktn_all_trains_both_teachers_then_the_student(tmp_path):
    run_dir = tmp_path / "m"
    assert train.main(["--method", "mktn", "--epochs", "1", "--run-dir", str(run_dir),
                       "--student-model", "resnet8", *FAST, *FAST_EXPORT]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # --stage all ends with the export of the student
    assert {p.name for p in (run_dir / "export").iterdir()} >= {"model_fp32.tflite", "model_int8.tflite",
                                                                 "model_card.json", "labels.txt"}
    assert metrics["stage"] == "export" and metrics["method"] == "mktn" and "test_accuracy" in metrics
    assert metrics["stages"]["export"]["formats"]["fp32"]["agreement_with_keras"] == 1.0
    assert (metrics["stages"]["teacher1"]["lambda_cls"], metrics["stages"]["teacher1"]["lambda_rec"]) == (0.0, 1.0)
    assert (metrics["stages"]["teacher2"]["lambda_cls"], metrics["stages"]["teacher2"]["lambda_rec"]) == (1.0, 0.0)
    assert metrics["stages"]["distill"]["teachers"] == [str(run_dir / "teacher1.keras"),
                                                        str(run_dir / "teacher2.keras")]
    assert (run_dir / "student.keras").is_file()


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    from tfkd import models
    from tfkd.teacher import ReconstructionTeacher

    folder = tmp_path_factory.mktemp("odd")
    ReconstructionTeacher(models.get("resnet8", 5)).save(folder / "five_classes.keras")
    keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10)]).save(
        folder / "plain.keras")
    (folder / "garbage.keras").write_bytes(b"not a zip")
    return folder


@pytest.mark.parametrize("teacher,extra,code,match", [
    ("five_classes.keras", [], 4, "the teacher has 5 classes, dataset digits has 10"),
    ("plain.keras", [], 4, "not a tfkd teacher"),
    ("garbage.keras", [], 4, "garbage.keras: damaged or not a .keras file"),
    ("missing.keras", [], 4, "missing.keras: teacher file not found"),
    (None, ["--set", "distill.stages=5"], 4, "distill.cft.stages = '5': stages run from 1 to 3"),
    (None, ["--method", "mktn"], 2, "expected 2 teacher file(s) for method mktn"),
])
def test_bad_teachers_fail_fast(tmp_path, capsys, digits_run, odd_models, teacher, extra, code, match):
    path = odd_models / teacher if teacher else digits_run / "teacher.keras"
    run_dir = tmp_path / "bad"
    args = ["--stage", "distill", "--teacher", str(path), "--run-dir", str(run_dir), "--epochs", "1", *FAST, *extra]
    assert train.main(args) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("tfkd: error: ") and match in err and "\n" not in err
    assert not (run_dir / "student.keras").exists() and not (run_dir / "metrics.json").exists()


def _free_ports(count):
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.mark.xdist_group("train-multiworker")  # long, needs no module fixture: its own unit
def test_multiworker_distillation_on_two_local_workers(tmp_path):
    """Two worker processes on 127.0.0.1 with TF_CONFIG: the chief writes the artifacts."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    run_dir = tmp_path / "mw"
    procs = []
    for index in range(2):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        args = [sys.executable, "-m", "tfkd.train", "--strategy", "multiworker", "--run-dir", str(run_dir),
                "--epochs", "2", "--student-model", "resnet8", *FAST, *FAST_EXPORT]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    report = "\n".join(f"worker {i}: exit {p.returncode}\n{err[-1500:]}" for i, (p, (_, err)) in
                       enumerate(zip(procs, outputs)))
    assert all(p.returncode == 0 for p in procs), report
    metrics = json.loads((run_dir / "metrics.json").read_text())["stages"]["distill"]
    assert metrics["method"] == "cft" and metrics["epochs"] == 2
    assert (run_dir / "teacher.keras").is_file() and (run_dir / "student.keras").is_file()
    assert (run_dir / "export" / "model_fp32.tflite").is_file()  # the chief exports
    assert "tfkd: done" in outputs[0][0]


@pytest.mark.xdist_group("train-multiworker-kill")  # long, needs no module fixture: its own unit
def test_multiworker_training_survives_a_killed_worker(tmp_path):
    """Two workers; worker 1 is SIGKILLed mid-training; the survivor fails (its collectives lose
    their peer) or is stopped; both restart with the same command and finish from the last
    backup (TensorFlow's BackupAndRestore fault tolerance), with the teacher an uninterrupted
    pair of workers makes, to the bit (the input order is replayed: callbacks.skip_epochs)."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    run_dir = tmp_path / "mw"

    def start(index, folder=run_dir):
        args = [sys.executable, "-m", "tfkd.train", "--strategy", "multiworker", "--stage", "teacher",
                "--run-dir", str(folder), "--epochs", "4", *FAST]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(procs):
        for proc, (_, err) in zip(procs, [p.communicate(timeout=600) for p in procs]):
            assert proc.returncode == 0, err[-2000:]

    procs = [start(0), start(1)]
    metadata = run_dir / "backup" / "teacher" / "training_metadata.json"
    deadline = time.time() + 400
    while time.time() < deadline and all(p.poll() is None for p in procs):
        try:
            if json.loads(metadata.read_text()).get("epoch", 0) >= 2:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    assert all(p.poll() is None for p in procs), "training ended before the kill"
    time.sleep(0.5)  # into the next epoch
    procs[1].send_signal(signal.SIGKILL)
    try:
        procs[0].wait(timeout=15)  # in a collective, a survivor waits for its lost peer for ever
    except subprocess.TimeoutExpired:
        procs[0].send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate()
    assert not (run_dir / "teacher.keras").exists()
    backed_up = json.loads(metadata.read_text())["epoch"]
    finish([start(0), start(1)])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 4 and metrics["epochs_run_here"] == 4 - backed_up
    with open(run_dir / "teacher_log.csv") as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f)]
    assert epochs[-1] == 3 and sorted(set(epochs)) == list(range(4))
    resumed = keras.saving.load_model(run_dir / "teacher.keras")
    finish([start(0, tmp_path / "uninterrupted"), start(1, tmp_path / "uninterrupted")])
    reference = keras.saving.load_model(tmp_path / "uninterrupted" / "teacher.keras")
    different = differing_weights(resumed, reference)
    assert not different, (backed_up, different[:5])


def test_every_distill_option_reaches_the_distiller():
    from tfkd import config as config_lib
    from tfkd import models

    cfg = config_lib.load(None, dotlist=[  # the old flat spellings, mapped onto distill.mktn.*
        "distill.method=mktn", "distill.alpha=2", "distill.beta=0.5", "distill.gamma=0.3",
        "distill.ce_weight=0.2", "distill.temperature=3", "distill.gan_loss=bce", "distill.stages=all",
        "distill.adapter_relu=true", "distill.adv_warmup_epochs=2", "distill.discriminator.width=0.5",
        "distill.discriminator.learning_rate=3e-5", "distill.discriminator.beta_1=0.7"])
    keras.utils.set_random_seed(0)
    reconstruction, classifier = models.get("resnet14", 10), models.get("resnet14", 10)
    distiller = pipeline.build_distiller(cfg, models.get("resnet8", 10), [reconstruction, classifier], 7)
    weights = distiller.weights_by_term
    assert (weights["ce"], weights["kd"], weights["feat"], weights["adv"]) == (0.2, 0.3, 2.0, 0.5)
    assert distiller.teacher("classifier") is classifier and distiller.teacher("autoencoder") is reconstruction
    terms = {t.name: t for t in distiller.terms}
    assert terms["kd"].temperature == 3.0 and terms["adv"].gan_loss == "bce"
    assert terms["adv"].warmup_steps == 14  # 2 epochs of 7 steps
    assert (terms["adv"].learning_rate, terms["adv"].beta_1) == (3e-5, 0.7)
    discriminators = terms["adv"].discriminators
    assert len(discriminators) == 3 and all(a.relu for a in distiller.adapters)
    first_convs = [d.get_layer("conv1").filters for d in discriminators]
    assert first_convs == [4, 8, 16]  # 16, 32, 64 teacher channels: C/2 times width 0.5
