"""tfkd.opcount: what a file runs in integer, read from the runtimes, on models of known ops."""

import keras
import numpy as np
import pytest

from tfkd import opcount, quantize
from tfkd.formats import convert_onnx, export_saved_model

pytestmark = pytest.mark.xdist_group("export")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Conv (ReLU) -> conv -> hard-swish -> pooling -> dense, as a SavedModel, its fp32 and int8
    (float input/output) .tflite files, its ONNX file and that file quantized (QDQ)."""
    folder = tmp_path_factory.mktemp("small")
    keras.utils.set_random_seed(0)
    images = keras.Input((16, 16, 3), name="images")
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="a")(images)
    x = keras.layers.Conv2D(32, 3, padding="same", name="b")(x)  # 9,216 weights: dynamic range quantizes it
    x = keras.layers.Activation("hard_swish", name="hs")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(images, {"logits": keras.layers.Dense(4, name="logits")(x)})
    export_saved_model(model, folder / "saved_model")
    calibration = np.random.default_rng(0).uniform(0, 255, (20, 16, 16, 3)).astype(np.float32)
    (folder / "fp32.tflite").write_bytes(quantize.legacy_tflite(folder / "saved_model", "fp32"))
    (folder / "int8.tflite").write_bytes(quantize.legacy_tflite(folder / "saved_model", "int8", calibration))
    (folder / "dynamic.tflite").write_bytes(quantize.legacy_tflite(folder / "saved_model", "dynamic"))
    convert_onnx(folder / "saved_model", folder / "model.onnx")
    quantize.onnx_qdq(folder / "model.onnx", folder / "int8.onnx", calibration)
    return folder


def test_fp32_tflite_is_all_float_and_xnnpack_takes_it_whole(small):
    counts = opcount.count(small / "fp32.tflite")
    assert counts["int_ops"] == counts["hybrid_ops"] == counts["conversions"] == 0
    assert counts["float_kinds"] == {"CONV_2D": 2, "HARD_SWISH": 1, "MEAN": 1, "FULLY_CONNECTED": 1}
    assert counts["xnnpack"] == {"partitions": 1, "delegated_ops": 5, "ops": 5, "not_delegated": {}}


def test_int8_tflite_counts_integer_ops_conversions_and_what_xnnpack_leaves(small):
    counts = opcount.count(small / "int8.tflite")
    assert counts["int_kinds"] == {"CONV_2D": 2, "HARD_SWISH": 1, "MEAN": 1, "FULLY_CONNECTED": 1}
    assert counts["float_ops"] == 0 and counts["conversions"] == 2  # float pixels in, float logits out
    x = counts["xnnpack"]
    assert x["ops"] == 7 and x["delegated_ops"] + sum(x["not_delegated"].values()) == 7
    assert x["partitions"] >= 1


def test_dynamic_range_ops_are_hybrid(small):
    counts = opcount.count(small / "dynamic.tflite")
    assert counts["int_ops"] == 0 and counts["hybrid_kinds"] == {"CONV_2D": 1}
    assert "HARD_SWISH" in counts["float_kinds"]


def test_onnx_counts_what_onnx_runtime_fuses_into_integer_kernels(small):
    """tf2onnx writes hard-swish as Add, Clip and Mul; ONNX Runtime's QDQ quantizer has no
    entry for Add and Mul, so they, and the convolution feeding them, run in float between a
    dequantize and a quantize; the other convolution, the pooling and the dense layer run as
    integer kernels."""
    assert opcount.count(small / "model.onnx")["int_ops"] == 0
    counts = opcount.count(small / "int8.onnx")
    assert counts["int_kinds"] == {"QLinearConv": 1, "QLinearGlobalAveragePool": 1, "QLinearMatMul": 1}
    assert {k: counts["float_kinds"].get(k) for k in ("Conv", "Add", "Mul")} == {"Conv": 1, "Add": 1, "Mul": 2}
    assert counts["conversions"] >= 2
    assert counts["ops"] == counts["int_ops"] + counts["float_ops"]
    assert opcount.describe(counts).startswith(f"{counts['ops']} ops: 3 integer")
