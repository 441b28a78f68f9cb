"""Every command the README shows runs as written, in order, in a fast setting.

The commands are read from the README itself (its ``bash`` blocks and inline ``python -m
tfkd...`` spans), with the placeholder data paths pointed at CIFAR-10 and flags appended that
shrink the work (one epoch, a small stratified subset, few verification images); nothing else
about a command is changed, so a command that names a file the ones before it never wrote, or
lacks an argument, fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
PLACEHOLDERS = ("path/to/cifar-10-batches-py", "/data/cifar-10-batches-py", "$TFKD_CIFAR10_DIR")
TEACHERS = "path/to/teachers"
#: Commands that cannot run on one machine in a test, and why.
NOT_HERE = {"TF_CONFIG=": "needs two machines (the multi-worker tests run two local workers)",
            "make ": "the test suite itself runs under make test", "pip install": "installs packages",
            "weights=imagenet": "downloads ImageNet weights and a TFDS dataset (no network here)"}
#: A user's photo folders the README names: created by the test, 3 classes of 30 photos.
PHOTOS = ("/data/flowers", "path/to/cifar224")


def readme_commands() -> list[str]:
    """The README's shell commands in order: ``bash`` blocks (continuations joined, comments
    dropped) and inline spans that start with ``python -m tfkd``."""
    text = (REPO / "README.md").read_text()
    commands: list[tuple[int, int, str]] = []
    for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
        joined = block.group(1).replace("\\\n", " ")
        for number, line in enumerate(joined.splitlines()):
            line = line.split(" #")[0].strip() if not line.strip().startswith("#") else ""
            if line:
                commands.append((block.start(), number, " ".join(line.split())))
    for span in re.finditer(r"`(python -m tfkd[^`]*)`", text):
        if "\n" not in span.group(1) and "--help" not in span.group(1):
            commands.append((span.start(), 0, span.group(1)))
    return [command for _, _, command in sorted(commands)]


def fast(argv: list[str]) -> list[str]:
    """The flags that shrink a command's work without changing what it does."""
    module = argv[2] if argv[:2] == ["python", "-m"] else argv[1] if argv[0] == "python" else argv[0]
    cifar = "cifar10" in argv
    if module == "tfkd.train":
        folder = any(a.startswith("folder:") for a in argv)  # the test's folders are small already
        small = ["--batch-size", "8"] if folder else ["--set", f"data.subset={0.02 if cifar else 0.2}"]
        return ["--epochs", "1", "--set", "progress=0", "--set", "export.formats=[fp32,int8]",
                "--set", "export.max_test_images=50", "--set", "export.representative=20", *small]
    if module == "tfkd.export":  # the formats the later commands read (every format: test_export)
        formats = [] if "--formats" in argv else ["--formats", "saved_model,fp32,int8,onnx"]
        return ["--max-test-images", "50", "--representative", "20", "--latency-runs", "2", *formats]
    if module == "tfkd.compress":
        return ["--epochs", "1", "--max-test-images", "50", "--batch-size", "32"]
    if module == "tfkd.bench":
        return {"accuracy": ["--epochs", "1", "--only", "student", "--seeds", "0", "--set", "data.subset=0.02"],
                "speed": ["--steps", "1", "--repeats", "1", "--methods", "kd", "--pipeline-batches", "1",
                          "--latency-runs", "0"],
                "pipeline": ["--batches", "1", "--steps", "1", "--batch-size", "8"],
                # --max-drop 100: a one-epoch student is noise, searching for its fragile ops is
                # test_budget's and test_deploy_bench's work (35 s here)
                "deploy": ["--only", "student", "--epochs", "1", "--set", "data.subset=0.01", "--set", "data.image_size=32",
                           "--formats", "fp32,int8", "--qat-epochs", "0", "--timing-runs", "3",
                           "--max-test-images", "20", "--latency-runs", "2", "--max-drop", "100"]}[argv[3]]
    return []


#: Commands are grouped by what they read and write, so independent groups can run apart
#: (pytest-xdist spreads them over the cores); within a group they run in README order.
GROUPS = {"mktn": ("runs/t2", "runs/m1"), "bench": ("tfkd.bench",), "demo": ("runs/demo",),
          "config": ("--config my.yaml",), "import": ("teachers/resnet20",),
          "yours": ("runs/f1", "artifacts/f1")}


def group_of(command: str) -> str:
    """The group of a README command (``main``: the t1/s1 chain and what reads its export)."""
    return next((name for name, marks in GROUPS.items() if any(m in command for m in marks)), "main")


def test_the_groups_cover_every_command():
    commands = readme_commands()
    assert len(commands) > 15 and any("tfkd.compress" in c for c in commands)
    assert {group_of(c) for c in commands} == {*GROUPS, "main"}


@pytest.mark.parametrize("group", [pytest.param(g, marks=pytest.mark.xdist_group(f"readme-{g}"))
                                   for g in ("main", *GROUPS)])
def test_every_readme_command_runs_as_written(tmp_path, cifar10_dir, teachers_dir, group):
    from PIL import Image

    from tfkd import data

    commands = [c for c in readme_commands() if group_of(c) == group]
    cifar = data.load_cifar_batches("cifar10", str(cifar10_dir))
    for name, index in (("image1.png", 0), ("image2.jpg", 1)):  # the images the kit commands name
        Image.fromarray(cifar.test_images[index]).save(tmp_path / name)
    (tmp_path / "my.yaml").write_text("teacher:\n  epochs: 1\n")  # the config file a command names
    if group in ("yours", "bench"):  # a user's photo folders and fine-tuned classifier
        from test_data import _photo_folder

        for folder in PHOTOS:
            _photo_folder(tmp_path / folder.strip("/"), per_class=30)
        if group == "yours":
            _users_classifier(tmp_path / "my_effnet.keras")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    ran = []
    for command in commands:
        if any(marker in command for marker in NOT_HERE):
            continue
        command = re.sub("|".join(re.escape(p) for p in PLACEHOLDERS), str(cifar10_dir), command)
        command = command.replace(TEACHERS, str(teachers_dir)).replace("folder:/data/", "folder:data/")
        argv = shlex.split(command)
        assigned = {}  # VAR=VALUE before the command: its environment
        while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
            key, value = argv.pop(0).split("=", 1)
            assigned[key] = value
        argv = [*argv, *fast(argv)]
        if argv[0] == "python":
            argv[0] = sys.executable
            if argv[1].startswith("export/"):
                argv[1] = str(REPO / argv[1])
        start = time.perf_counter()
        result = subprocess.run(argv, cwd=tmp_path, env={**env, **assigned}, capture_output=True,
                                text=True, timeout=900)
        print(f"{time.perf_counter() - start:6.1f} s  {command[:100]}")
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        ran.append(command)
    assert ran
    CHECKS.get(group, lambda cwd: None)(tmp_path)


def _users_classifier(path: Path) -> None:
    """A user's fine-tuned classifier as users save them: a keras.applications network built for
    any image size, called as a layer, with a softmax head for the photos' three classes."""
    import keras

    base = keras.applications.EfficientNetB0(include_top=False, weights=None)
    images = keras.Input((None, None, 3))
    scores = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(base(images)))
    keras.Model(images, scores).save(path)


def check_yours(cwd: Path) -> None:
    """The user's teacher distilled into a MobileNetV3-Small at 224 px from a folder, exported
    with a uint8 full-integer model."""
    import json

    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    card = json.loads((cwd / "artifacts/f1/model_card.json").read_text())
    assert card["model"] == "keras_MobileNetV3Small" and card["input"]["shape"] == [None, 224, 224, 3]
    assert card["preprocessing"] == {"resize": "center_crop", "size": 224, "crop_fraction": 0.875}
    assert card["int8_io"] == "uint8" and card["formats"]["fp32"]["within_tolerance"] is True
    assert card["formats"]["onnx"]["within_tolerance"] is True
    runner = Interpreter(model_path=str(cwd / "artifacts/f1/model_int8.tflite")).get_signature_runner("serving_default")
    assert runner.get_input_details()["images"]["dtype"] == np.uint8  # full integer, for an NPU
    assert runner.get_output_details()["logits"]["dtype"] == np.uint8


def check_main(cwd: Path) -> None:
    """The t1/s1 chain wrote what the README says: exports, and compress reports."""
    import json

    assert (cwd / "artifacts/s1/model_card.json").is_file() and (cwd / "x.tflite").is_file()
    assert (cwd / "x.onnx").is_file() and (cwd / "artifacts/s1-npu/model_int8.tflite").is_file()
    for method in ("qat", "prune"):  # tfkd.compress
        report = json.loads((cwd / f"artifacts/s1-{method}/compress_report.json").read_text())
        assert report["parity_max_abs_logit_diff"] <= report["parity_allowed"]  # the tf_keras rebuild
        assert (cwd / f"artifacts/s1-{method}/model_int8.tflite").stat().st_size == report["compressed_int8"]["bytes"]
        assert report["compressed_int8"]["bytes"] < 0.5 * report["fp32_tflite"]["bytes"]
        assert 0.0 <= report["compressed_int8"]["top1"] <= 1.0 and report["test_images"] == 50
        if method == "prune":
            assert abs(report["sparsity"] - 0.5) <= 0.02
            assert report["compressed_int8"]["gzip_bytes"] < report["post_training_int8"]["gzip_bytes"]
        else:
            assert report["teacher"] == "runs/t1/teacher.keras" and report["kd_alpha"] == 0.9


def check_mktn(cwd: Path) -> None:
    """mktn's teacher stage trained Teacher1 (reconstruction only) and Teacher2 (classifier)."""
    import json

    assert (cwd / "runs/m1/student.keras").is_file()
    stages = json.loads((cwd / "runs/t2/metrics.json").read_text())["stages"]
    assert (stages["teacher1"]["lambda_cls"], stages["teacher1"]["lambda_rec"]) == (0.0, 1.0)
    assert (stages["teacher2"]["lambda_cls"], stages["teacher2"]["lambda_rec"]) == (1.0, 0.0)


def check_import(cwd: Path) -> None:
    """The imported teacher's record holds its measured accuracy, the published 91.73%."""
    import json

    record = json.loads((cwd / "teachers/resnet20.json").read_text())
    assert record["test_images"] == 10_000 and abs(record["test_accuracy"] - 0.9173) <= 0.0005
    assert (cwd / "runs/kd20/student.keras").is_file()


CHECKS = {"main": check_main, "mktn": check_mktn, "import": check_import, "yours": check_yours}
