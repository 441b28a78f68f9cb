import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from tfkd import export
from tfkd.errors import ExportError, ModelError

pytestmark = pytest.mark.xdist_group("export")  # module fixtures: built once, on one worker


def test_every_format_is_written_and_named(exported):
    out, card = exported
    names = {p.name for p in out.iterdir()}
    assert {"saved_model", "model_fp32.tflite", "model_fp16.tflite", "model_dynamic.tflite",
            "model_int8.tflite", "model.onnx", "labels.txt", "model_card.json", "model_card.md"} <= names
    assert not [n for n in names if n.startswith(".tmp")]
    assert (out / "labels.txt").read_text().splitlines() == [str(i) for i in range(10)]
    assert json.loads((out / "model_card.json").read_text()) == json.loads(json.dumps(card))


def test_fp32_formats_match_keras(exported):
    _, card = exported
    for fmt in ("saved_model", "fp32", "onnx"):
        entry = card["formats"][fmt]
        assert entry["agreement_with_keras"] == 1.0, fmt
        assert entry["max_abs_logit_diff"] <= 1e-4, fmt
        assert entry["within_tolerance"] is True
    assert card["formats"]["onnx"]["onnx_checker"] == "passed (full_check)"
    # quantized formats are close, and smaller
    assert card["formats"]["int8"]["agreement_with_keras"] > 0.8
    assert card["formats"]["int8"]["bytes"] < 0.5 * card["formats"]["fp32"]["bytes"]
    assert card["formats"]["fp16"]["bytes"] < 0.6 * card["formats"]["fp32"]["bytes"]


def test_the_int8_onnx_model_is_static_qdq_with_signed_weights(exported):
    """ONNX Runtime's recommended int8 for CNNs: QDQ nodes, int8 (per-channel) weights and int8
    activations, verified in ONNX Runtime against Keras like the other formats."""
    import onnx

    out, card = exported
    entry = card["formats"]["onnx_int8"]
    assert entry["agreement_with_keras"] > 0.8 and entry["onnx_checker"] == "passed (full_check)"
    assert entry["bytes"] < 0.5 * card["formats"]["onnx"]["bytes"]
    graph = onnx.load(str(out / "model_int8.onnx")).graph
    kinds = [node.op_type for node in graph.node]
    assert kinds.count("QuantizeLinear") >= 5 and kinds.count("DequantizeLinear") >= 10
    assert [i.type.tensor_type.elem_type for i in graph.input] == [onnx.TensorProto.FLOAT]  # float pixels in
    int8 = {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.INT8}
    conv_weights = [n.input[1] for n in graph.node if n.op_type == "Conv"]
    weight_sources = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert conv_weights and all(weight_sources.get(w) in int8 for w in conv_weights)
    zero_points = [init.data_type for init in graph.initializer if init.name.endswith("zero_point")]
    assert onnx.TensorProto.INT8 in zero_points and onnx.TensorProto.UINT8 not in zero_points  # S8S8
    assert set(zero_points) <= {onnx.TensorProto.INT8, onnx.TensorProto.INT32}  # int32: the biases


def test_contract_pixels_in_normalization_inside(exported, student_run, digits):
    """Raw [0, 255] pixels into each runtime give the Keras student's logits on normalized input."""
    out, _ = exported
    student = keras.saving.load_model(student_run / "student.keras")
    pixels = digits.test_images[:5].astype(np.float32)
    expected = student(digits.normalize(pixels), training=False)["logits"].numpy()
    for fmt in ("saved_model", "fp32", "onnx"):
        got = export.runner(fmt, out / export.FILES[fmt])(pixels)
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=fmt)
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]
    probabilities = session.run(["probabilities"], {"images": pixels})[0]
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(out / "model_fp32.tflite")).get_signature_runner("serving_default")
    assert set(runner.get_output_details()) == {"logits", "probabilities"}


def test_uint8_io_int8_model(student_run, digits, tmp_path, capfd, recwarn):
    card = export.export(student_run, tmp_path / "u8", ["int8"], int8_io="uint8", max_test_images=120,
                         latency_runs=2, data=digits)
    # a clean console: the converter's C++ settings line and the deprecation warning of the
    # tf.lite.Interpreter its calibration creates stay off it (--verbose shows them)
    err = capfd.readouterr().err
    assert "fully_quantize" not in err and "Interpreter is deprecated" not in err, err[-500:]
    assert not [w for w in recwarn if "Interpreter is deprecated" in str(w.message)]
    from ai_edge_litert.interpreter import Interpreter

    details = Interpreter(model_path=str(tmp_path / "u8" / "model_int8.tflite")).get_signature_runner(
        "serving_default").get_input_details()["images"]
    assert details["dtype"] == np.uint8
    assert card["formats"]["int8"]["agreement_with_keras"] > 0.8


def test_standard_converters_work_on_the_export(exported, tmp_path):
    out, _ = exported
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    tflite_convert = Path(sys.executable).parent / "tflite_convert"
    result = subprocess.run([str(tflite_convert), "--saved_model_dir", str(out / "saved_model"),
                             "--output_file", str(tmp_path / "x.tflite")], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-1000:]
    result = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(out / "saved_model"),
                             "--output", str(tmp_path / "x.onnx")], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-1000:]
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    reference = export.runner("fp32", out / "model_fp32.tflite")(pixels)
    np.testing.assert_allclose(export.runner("fp32", tmp_path / "x.tflite")(pixels), reference, atol=1e-4)
    np.testing.assert_allclose(export.runner("onnx", tmp_path / "x.onnx")(pixels), reference, atol=1e-4)


def test_failed_verification_writes_nothing(student_run, digits, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ExportError, match="disagree with the Keras model beyond 1e-12"):
        export.export(student_run, out, ["fp16", "onnx"], tolerance=1e-12, max_test_images=50,
                      latency_runs=1, data=digits)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_failed_export_keeps_the_previous_one(student_run, digits, tmp_path, exported):
    out = tmp_path / "kept"
    shutil.copytree(exported[0], out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ExportError):
        export.export(student_run, out, ["onnx"], tolerance=1e-12, max_test_images=20, latency_runs=1, data=digits)
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "missing.keras", "model file not found"),
    (lambda d: d / "teacher.keras", "this is a teacher"),
    (lambda d: d / "not_a_model.keras", "damaged or not a .keras file"),
])
def test_bad_sources(student_run, tmp_path, make, match):
    from tfkd import models
    from tfkd.teacher import ReconstructionTeacher

    ReconstructionTeacher(models.get("resnet8", 10)).save(tmp_path / "teacher.keras")
    (tmp_path / "not_a_model.keras").write_bytes(b"junk")
    with pytest.raises(ModelError, match=match):
        export.export(make(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_exit_codes(student_run, tmp_path, capsys):
    assert export.main([str(student_run), "--out", str(tmp_path / "o"), "--formats", "fp32,tiff"]) == 2  # a bad option (was 4 before the reliability issue)
    assert "--formats fp32,tiff: expected some of" in capsys.readouterr().err
    assert export.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 4
