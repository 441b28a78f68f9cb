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


# ----------------------------------------------------------------- other tools' models, images
def _classifier(channels=3, softmax=True, size=8):
    """A tiny Keras classifier of [0, 255] pixels (rescale, average pool, dense to 4 classes),
    ending in a softmax or in logits."""
    import keras

    keras.utils.set_random_seed(0)
    images = keras.Input((size, size, channels))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 64)(images))
    x = keras.layers.Dense(4, kernel_initializer=keras.initializers.RandomNormal(0, 1, seed=1))(x)
    return keras.Model(images, keras.layers.Softmax()(x) if softmax else x)


def _tflite(model, path, input_name="images", output_name="logits", batch=None):
    """``model`` as a .tflite whose signature names its input and output as given (Keras's
    SavedModel exporter, then the TFLite converter)."""
    import keras
    import tensorflow as tf

    images = keras.Input(model.input_shape[1:], batch_size=batch, name=input_name)
    saved = path.with_suffix(".saved_model")
    keras.Model(images, {output_name: model(images)}).export(str(saved), format="tf_saved_model", verbose=False)
    path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert())
    return path


def _onnx(model, path, input_name="input_1", nchw=False):
    """``model`` as an ONNX file made by tf2onnx (another tool's output names: ``Identity:0``)."""
    import tensorflow as tf
    import tf2onnx

    shape = model.input_shape[1:]
    spec = (tf.TensorSpec([None, shape[2], *shape[:2]] if nchw else [None, *shape], tf.float32, name=input_name),)
    fn = tf.function(lambda x: model(tf.transpose(x, [0, 2, 3, 1]) if nchw else x), input_signature=spec)
    tf2onnx.convert.from_function(fn, input_signature=spec, output_path=str(path), opset=17)
    return path


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Three 8x8 RGB PNGs (no resize at 8 px) and their pixels."""
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)
    pixels[1] //= 4  # a dark one: other probabilities than the rest
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"p{i}.png")
    return folder, pixels


def _printed(stdout):
    """{class: probability} per printed line of predict.py."""
    found = []
    for line in stdout.strip().splitlines():
        pairs = line.split(": ", 1)[1].split(", ")
        found.append({p.rsplit(" ", 1)[0]: float(p.rsplit(" ", 1)[1]) for p in pairs})
    return found


@pytest.mark.parametrize("make", ["tflite", "onnx", "onnx_nchw"])
def test_a_model_ending_in_softmax_is_not_softmaxed_again(no_tensorflow, pictures, tmp_path, make):
    folder, pixels = pictures
    model = _classifier(softmax=True)
    path = (_tflite(model, tmp_path / "s.tflite") if make == "tflite" else
            _onnx(model, tmp_path / "s.onnx", nchw=make == "onnx_nchw"))
    expected = model.predict(pixels.astype(np.float32), verbose=0)
    assert np.ptp(expected, axis=1).min() > 0.05  # the softmax of these would be much flatter
    result = kit(no_tensorflow, "predict.py", path, *sorted(folder.glob("p*.png")), "--top", "4")
    assert result.returncode == 0, result.stderr
    for got, want in zip(_printed(result.stdout), expected):
        np.testing.assert_allclose([got[str(i)] for i in range(4)], want, atol=6e-4)


def test_a_logits_model_is_softmaxed_and_a_graph_that_cannot_be_read_is_judged_by_its_outputs(
        no_tensorflow, pictures, tmp_path):
    folder, pixels = pictures
    model = _classifier(softmax=False)
    logits = model.predict(pixels.astype(np.float32), verbose=0)
    path = _onnx(model, tmp_path / "l.onnx")
    result = kit(no_tensorflow, "predict.py", path, *sorted(folder.glob("p*.png")), "--top", "4")
    assert result.returncode == 0, result.stderr
    e = np.exp(logits - logits.max(1, keepdims=True))
    for got, want in zip(_printed(result.stdout), e / e.sum(1, keepdims=True)):
        np.testing.assert_allclose([got[str(i)] for i in range(4)], want, atol=6e-4)
    sys.path.insert(0, str(KIT))
    try:
        import runtimes
    finally:
        sys.path.remove(str(KIT))
    edge = runtimes.EdgeModel(path)
    assert edge.outputs_probabilities is False
    edge.outputs_probabilities = None  # as for a graph the kit cannot read
    probs = np.array([[0.7, 0.2, 0.1, 0.0]], np.float32)
    edge.logits = lambda images: probs
    np.testing.assert_array_equal(edge.probabilities(pixels[:1].astype(np.float32)), probs)
    edge.logits = lambda images: np.log(probs + 1e-3) - 1  # negative: logits, softmaxed
    np.testing.assert_allclose(edge.probabilities(pixels[:1].astype(np.float32)).sum(), 1.0, rtol=1e-6)
    assert edge.probabilities(pixels[:1].astype(np.float32))[0, 3] > 0


def _rgba_cases():
    """(name, PIL image, expected RGB at the four probed pixels) for transparent PNGs."""
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)          # transparent black: the white background
    rgba[0, 1] = (0, 0, 0, 255)        # opaque black
    rgba[0, 2] = (100, 50, 200, 128)   # half: (c * 128 + 255 * 127 + 127) // 255
    rgba[0, 3] = (255, 0, 0, 1)
    la = np.stack([rgba[..., 0], rgba[..., 3]], -1)
    palette = Image.fromarray(np.array([[0, 1, 2, 3]] + [[0] * 4] * 3, np.uint8), "P")
    palette.putpalette([0, 0, 0, 0, 0, 0, 100, 50, 200, 255, 0, 0])
    palette.info["transparency"] = bytes([0, 255, 128, 1])
    return [("RGBA", Image.fromarray(rgba, "RGBA"), [(255, 255, 255), (0, 0, 0), (177, 152, 227), (255, 254, 254)]),
            ("LA", Image.fromarray(la, "LA"), [(255, 255, 255), (0, 0, 0), (177, 177, 177), (255, 255, 255)]),
            ("P with transparency", palette, [(255, 255, 255), (0, 0, 0), (177, 152, 227), (255, 254, 254)])]


@pytest.mark.parametrize("name,image,expected", _rgba_cases(), ids=[c[0] for c in _rgba_cases()])
def test_transparent_images_are_composited_on_white_by_training_and_by_the_kit(tmp_path, name, image, expected):
    import tensorflow as tf

    from tfkd.data import transforms

    sys.path.insert(0, str(KIT))
    try:
        import predict
    finally:
        sys.path.remove(str(KIT))
    path = tmp_path / "t.png"
    image.save(path, **({"transparency": image.info["transparency"]} if "transparency" in image.info else {}))
    trained = transforms.decode(tf.io.read_file(str(path))).numpy()
    device = predict.load_image(path, (4, 4)).astype(np.uint8)
    np.testing.assert_array_equal(trained, device)
    assert [tuple(int(v) for v in trained[0, i]) for i in range(4)] == expected
    assert int(trained[1:].min()) == 255  # the rest: transparent, white


def test_predict_on_a_transparent_image_is_predict_on_it_composited(no_tensorflow, exported, digits, tmp_path):
    """A dark digit on a transparent background reads as that digit drawn on white (alpha
    dropped, the same digit would be a black square)."""
    image = digits.test_images[0]
    alpha = (255 - image[..., :1]).astype(np.uint8)
    Image.fromarray(np.concatenate([np.zeros_like(image), alpha], -1), "RGBA").save(tmp_path / "t.png")
    composite = (np.zeros_like(image, np.uint32) * alpha + 255 * (255 - alpha.astype(np.uint32)) + 127) // 255
    Image.fromarray(composite.astype(np.uint8)).save(tmp_path / "c.png")
    result = kit(no_tensorflow, "predict.py", exported[0] / "model.onnx", tmp_path / "t.png", tmp_path / "c.png",
                 "--top", "10")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split(": ", 1)[1] == lines[1].split(": ", 1)[1]
    assert not np.array_equal(composite.astype(np.uint8), np.zeros_like(image))


def _unsigned_tflite(path, softmax=False):
    """A .tflite without signatures (TensorFlow 1's session converter, as older tools wrote
    them): input 'input' [N, 8, 8, 3], output 'scores' (mean pixel x a fixed matrix)."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 8, 8, 3], name="input")
        y = tf.matmul(tf.reduce_mean(x, [1, 2]), tf.constant(np.arange(12, dtype=np.float32).reshape(3, 4) / 100))
        y = tf.identity(tf.nn.softmax(y) if softmax else y, name="scores")
        with tf.compat.v1.Session(graph=graph) as session:
            path.write_bytes(tf.compat.v1.lite.TFLiteConverter.from_session(session, [x], [y]).convert())
    return path


@pytest.mark.parametrize("case", ["tflite named pixels/scores", "tflite for batch 1", "tflite without signatures",
                                  "tflite without signatures, softmax", "onnx named input_1/Identity:0"])
def test_the_kit_runs_another_tools_single_input_classifier(no_tensorflow, pictures, tmp_path, case):
    folder, pixels = pictures
    x = pixels.astype(np.float32)
    if case.startswith("tflite without"):
        softmax = case.endswith("softmax")
        path = _unsigned_tflite(tmp_path / "old.tflite", softmax)
        logits = x.mean(axis=(1, 2)) @ (np.arange(12, dtype=np.float32).reshape(3, 4) / 100)
    else:
        model, softmax = _classifier(softmax=False), False
        logits = model.predict(x, verbose=0)
        path = (_onnx(model, tmp_path / "m.onnx") if case.startswith("onnx") else
                _tflite(model, tmp_path / "m.tflite", "pixels", "scores", batch=1 if "batch 1" in case else None))
    result = kit(no_tensorflow, "predict.py", path, *sorted(folder.glob("p*.png")), "--top", "4")
    assert result.returncode == 0, result.stderr
    e = np.exp(logits - logits.max(1, keepdims=True))
    for got, want in zip(_printed(result.stdout), e / e.sum(1, keepdims=True)):
        np.testing.assert_allclose([got[str(i)] for i in range(4)], want, atol=6e-4)
    bench = kit(no_tensorflow, "benchmark.py", path, "--runs", "3", "--warmup", "1", "--batch-sizes", "2",
                "--out", tmp_path / "b")
    assert bench.returncode == 0, bench.stderr
