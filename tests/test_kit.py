"""The export/ kit runs where TensorFlow cannot be imported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.xdist_group("export")  # module fixtures: built once, on one worker

KIT = Path(__file__).resolve().parents[1] / "export"


@pytest.fixture(scope="module")
def no_tensorflow(tmp_path_factory):
    """A PYTHONPATH entry whose tensorflow, keras and tf_keras packages refuse to import."""
    folder = tmp_path_factory.mktemp("blocked")
    for name in ("tensorflow", "keras", "tf_keras"):
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is not on this board')\n")
    return folder


def kit(no_tensorflow, script, *args):
    env = {**os.environ, "PYTHONPATH": str(no_tensorflow)}
    return subprocess.run([sys.executable, str(KIT / script), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_tensorflow_is_really_blocked(no_tensorflow):
    result = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(no_tensorflow)})
    assert result.returncode != 0 and "not on this board" in result.stderr


def test_kit_never_imports_tensorflow():
    for path in KIT.glob("*.py"):
        text = path.read_text()
        assert "import tensorflow" not in text and "import keras" not in text, path


@pytest.mark.parametrize("model", ["model_int8.tflite", "model_fp32.tflite", "model.onnx"])
def test_predict_matches_the_exported_model(no_tensorflow, exported, digits, tmp_path, model):
    out, _ = exported
    images = digits.test_images[:4]
    for i, image in enumerate(images[:2]):
        Image.fromarray(image).save(tmp_path / f"img{i}.png")
    np.save(tmp_path / "batch.npy", images[2:].astype(np.float32))
    result = kit(no_tensorflow, "predict.py", out / model, tmp_path / "img0.png", tmp_path / "img1.png",
                 tmp_path / "batch.npy", "--top", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4
    from tfkd import export

    logits = export.runner("onnx" if model.endswith(".onnx") else "fp32", out / model)(images.astype(np.float32))
    for line, expected in zip(lines, logits.argmax(1)):
        assert line.split(": ")[1].split()[0] == str(expected)  # labels.txt names the digits


@pytest.mark.parametrize("make_input,code,match", [
    (lambda d: np.save(d / "x.npy", np.zeros((2, 28, 28, 3), np.float32)) or d / "x.npy", 3, "input shape (2, 28, 28, 3)"),
    (lambda d: np.save(d / "x.npy", np.full((1, 32, 32, 3), np.nan, np.float32)) or d / "x.npy", 3, "NaN"),
    (lambda d: np.save(d / "x.npy", np.full((1, 32, 32, 3), np.inf, np.float32)) or d / "x.npy", 3, "infinite"),
    (lambda d: np.save(d / "x.npy", np.full((1, 32, 32, 3), 300.0, np.float32)) or d / "x.npy", 3, "expected [0, 255]"),
    (lambda d: np.save(d / "x.npy", np.zeros((1, 32, 32, 3), np.complex64)) or d / "x.npy", 3, "input dtype complex64"),
    (lambda d: (d / "x.txt").write_text("hi") and d / "x.txt", 3, "unsupported file type '.txt'"),
    (lambda d: (d / "x.png").write_bytes(b"\x89PNG broken") and d / "x.png", 3, "not a readable image"),
    (lambda d: d / "missing.png", 3, "missing.png: not found"),
])
def test_predict_rejects_bad_input(no_tensorflow, exported, tmp_path, make_input, code, match):
    result = kit(no_tensorflow, "predict.py", exported[0] / "model.onnx", make_input(tmp_path))
    assert result.returncode == code and match in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("model,match", [("labels.txt", "expected a .onnx or .tflite model"),
                                         ("nope.onnx", "model file not found")])
def test_predict_rejects_bad_models(no_tensorflow, exported, tmp_path, model, match):
    np.save(tmp_path / "x.npy", np.zeros((1, 32, 32, 3), np.float32))
    result = kit(no_tensorflow, "predict.py", exported[0] / model, tmp_path / "x.npy")
    assert result.returncode == 4 and match in result.stderr


def test_benchmark_measures_every_model(no_tensorflow, exported, tmp_path):
    result = kit(no_tensorflow, "benchmark.py", exported[0], "--runs", "10", "--warmup", "2",
                 "--batch-sizes", "4", "--threads", "1", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "benchmark.json").read_text())
    files = {m["file"] for m in report["models"]}
    from tfkd.formats import FILES

    assert files == {f for f in FILES.values() if f.endswith((".onnx", ".tflite"))}
    assert "model_litert_int8.tflite" in files and "model_int8.onnx" in files
    for m in report["models"]:
        p = m["batch1_ms"]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"] and m["images_per_second"]["4"] > 0
    assert Image.open(tmp_path / "benchmark.png").size[0] > 300


def test_predict_crops_and_resizes_as_training_did(tmp_path):
    """The kit's Pillow crop-and-resize gives the pixels tfkd's pipeline trains and tests on."""
    sys.path.insert(0, str(KIT))
    try:
        import predict
    finally:
        sys.path.remove(str(KIT))
    from test_data import _photo_folder

    from tfkd import data

    root = _photo_folder(tmp_path / "photos")
    for size in (96, 48):
        prepared = data.prepare(f"folder:{root}", image_size=size, pipeline="streaming")
        expected, _ = prepared.pixels("test")
        record = prepared.geometry.record()
        got = np.stack([predict.load_image(Path(p), (size, size), record)
                        for p in prepared.records.paths["test"]])
        diff = np.abs(got - expected.astype(np.float32))
        assert diff.mean() < 0.5 and diff.max() <= 10, (size, diff.mean(), diff.max())  # rounding, edges
    # the record comes from the model card beside the model, else from tfkd's rule for the size
    (tmp_path / "model_card.json").write_text(json.dumps({"preprocessing": {
        "resize": "center_crop", "size": 96, "crop_fraction": 0.9}}))
    assert predict.preprocessing_of(tmp_path / "model.onnx", (96, 96))["crop_fraction"] == 0.9
    assert predict.preprocessing_of(tmp_path / "elsewhere" / "m.onnx", (224, 224)) == {
        "resize": "center_crop", "crop_fraction": 0.875}
    assert predict.preprocessing_of(tmp_path / "elsewhere" / "m.onnx", (32, 32)) == {"resize": "stretch"}
    assert predict.crop_box(400, 300, {"resize": "center_crop", "crop_fraction": 0.875}) == (69, 19, 331, 281)


def test_predict_on_a_folder_leaves_out_macos_copies(no_tensorflow, exported, digits, tmp_path):
    Image.fromarray(digits.test_images[0]).save(tmp_path / "0.png")
    (tmp_path / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    result = kit(no_tensorflow, "predict.py", exported[0] / "model.onnx", tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1 and "._0.png" not in result.stdout
