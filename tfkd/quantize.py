"""The quantized formats: how each is made from the float model, how some of its ops are kept
in float, and how much quantizing each op costs (the ranking the accuracy budget searches).

Three tool chains, each the one its runtime's authors recommend:

- **LiteRT's converter** (the legacy path): ``int8``, full-integer from the SavedModel,
  calibrated on training images; ops are kept in float with TensorFlow's quantization
  debugger (``denylisted_nodes``: ops by their output tensor's name).
- **LiteRT Quantizer** (``litert-quantizer``; Google's current path, no TensorFlow): from the
  fp32 ``.tflite``, ``litert_dynamic`` (int8 weights, float activations quantized on the fly: the
  CPU/GPU recipe), ``litert_int8`` (static int8 weights and activations) and ``litert_a16w8``
  (int8 weights, int16 activations: the NPU recipes). Ops are kept in float with a
  ``no_quantize`` rule whose regular expression matches their output tensor's name exactly.
- **ONNX Runtime's** static QDQ quantizer: ``onnx_int8``; ops are kept in float with
  ``nodes_to_exclude``.

The ranking: each tensor the quantized file quantizes, computed by the float model on a few
calibration images, is quantized with the scale and zero point the file gave it; the mean over
its channels of each channel's signal-to-quantization-noise ratio (dB) says how much of it
survives. Low first: a tensor whose range is stretched by a few large values (an outlier
channel) leaves its other channels a few levels wide, and ranks first. The ratio is local (each
tensor from the float model, not the quantized one), so an early bad op does not push every
later one up. Keeping a tensor in float means its producer and its consumers compute in float
(``Candidate``): otherwise the consumers would quantize it again with the same range.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from tfkd.cli import quiet_native_logs
from tfkd.errors import ModelError

#: LiteRT Quantizer recipes by format.
LITERT_RECIPES = {"litert_dynamic": "dynamic_wi8_afp32", "litert_int8": "static_wi8_ai8",
                  "litert_a16w8": "static_wi8_ai16"}
SIGNATURE = "serving_default"


@dataclass(frozen=True)
class Candidate:
    """A quantized tensor the repair can keep in float, with the ops that must then compute in
    float so that it is never quantized (its producer and every consumer), and its SQNR (dB)."""

    tensor: str
    ops: tuple[str, ...]
    sqnr_db: float


def _samples(images: np.ndarray) -> Iterable[dict[str, np.ndarray]]:
    for image in images:
        yield {"images": image[None].astype(np.float32)}


# ------------------------------------------------------------------------------ LiteRT's converter
def legacy_tflite(saved_model: Path, mode: str, representative: np.ndarray | None = None,
                  int8_io: str = "float32", keep_float: Sequence[str] = ()) -> bytes:
    """A TFLite flatbuffer from the SavedModel with LiteRT's converter: ``fp32``, ``fp16``
    (float16 weights), ``dynamic`` (int8 weights, float activations) or ``int8`` (full integer,
    calibrated on ``representative`` pixels; ``int8_io`` its input/output type). ``keep_float``:
    ops of ``int8`` (by output tensor name) left in float, through TensorFlow's quantization
    debugger."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if mode != "fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    if mode != "int8":
        with quiet_native_logs():
            return converter.convert()
    if representative is None or not len(representative):
        raise ModelError("int8 export needs representative images")
    converter.representative_dataset = lambda: _samples(representative)
    io_type = {"float32": tf.float32, "int8": tf.int8, "uint8": tf.uint8}[int8_io]
    converter.inference_input_type = io_type
    converter.inference_output_type = io_type
    if not keep_float:
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        with quiet_native_logs():  # its calibration runs tf.lite.Interpreter, which warns it is deprecated
            return converter.convert()
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    options = tf.lite.experimental.QuantizationDebugOptions(
        denylisted_nodes=list(keep_float), fully_quantize=int8_io != "float32")
    with quiet_native_logs():  # the debugger runs tf.lite.Interpreter too
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=lambda: _samples(representative[:1]), debug_options=options)
        return debugger.get_nondebug_quantized_model()


# ------------------------------------------------------------------------------ LiteRT Quantizer
def litert(fp32_model: bytes, fmt: str, representative: np.ndarray | None = None,
           keep_float: Sequence[str] = ()) -> bytes:
    """``fmt`` (``litert_dynamic``, ``litert_int8``, ``litert_a16w8``) of the fp32 ``.tflite``
    with LiteRT Quantizer; the static recipes are calibrated on ``representative`` pixels.
    ``keep_float``: ops (by output tensor name) left unquantized."""
    from litert_quantizer import quantizer, recipe

    from tfkd.opcount import _stderr_of

    quant = quantizer.Quantizer(bytearray(fp32_model))
    quant.load_quantization_recipe(getattr(recipe, LITERT_RECIPES[fmt])())
    tail = output_ops(fp32_model)
    if set(keep_float) & set(tail):  # LiteRT Quantizer leaves a float output op's sibling outputs unwired
        keep_float = list(dict.fromkeys([*keep_float, *tail]))
    for name in keep_float:
        # an op's scope is its output tensor names, each followed by ";"
        quant.update_quantization_recipe(f"^{re.escape(name)};", "*", algorithm_key="no_quantize")

    def run() -> bytes:
        calibration = None
        if quant.need_calibration:
            if representative is None or not len(representative):
                raise ModelError(f"{fmt} export needs representative images")
            calibration = quant.calibrate({SIGNATURE: list(_samples(representative))}, num_threads=2)
        return bytes(quant.quantize(calibration, enable_progress_bar=False,
                                    enable_progress_report=False).quantized_model)

    model, _ = _stderr_of(run)  # its progress bars
    return model


def output_ops(model: bytes) -> list[str]:
    """The output tensor names of the ops that produce a ``.tflite`` model's signature outputs."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    outputs = {d["index"] for d in interpreter.get_signature_runner(SIGNATURE).get_output_details().values()}
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    return [names[int(op["outputs"][0])] for op in interpreter._get_ops_details()
            if op["op_name"] != "DELEGATE" and any(int(t) in outputs for t in op["outputs"])]


# ------------------------------------------------------------------------------ ONNX Runtime
class _Calibration:
    """ONNX Runtime's calibration reader over pixel images, one at a time."""

    def __init__(self, images: np.ndarray, name: str) -> None:
        self.images, self.name, self.position = images, name, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.images):
            return None
        self.position += 1
        return {self.name: self.images[self.position - 1][None].astype(np.float32)}

    def rewind(self) -> None:
        self.position = 0


def onnx_qdq(model: Path, path: Path, representative: np.ndarray, keep_float: Sequence[str] = ()) -> None:
    """Static int8 quantization of the fp32 ONNX model in ONNX Runtime's QDQ format (signed
    activations and per-channel signed weights, min-max calibration on ``representative``
    pixels), after its recommended pre-processing (shape inference, graph optimization).
    ``keep_float``: nodes (by name) left unquantized."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    if representative is None or not len(representative):
        raise ModelError("onnx_int8 export needs representative images")
    name = onnx.load(str(model)).graph.input[0].name
    reader = type("Reader", (_Calibration, CalibrationDataReader), {})(representative, name)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(path), reader, quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(keep_float),
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})


# ------------------------------------------------------------------------------ the ranking
#: Per-channel ratios are capped here: a channel that quantizes almost exactly does not make up
#: for one that is lost.
SQNR_CAP_DB = 60.0


def sqnr_db(values: np.ndarray, scale: float, zero_point: int, dtype: Any) -> float:
    """How much of ``values`` survives quantization with ``scale`` and ``zero_point`` to ``dtype``:
    the mean over channels of each channel's signal-to-quantization-noise ratio (dB, capped at
    ``SQNR_CAP_DB``), so that a few wide channels cannot hide many narrow ones flattened to a
    few levels, or the whole tensor's ratio when lower (a wide channel clipped). The channel axis is not known for every runtime's layout (NHWC, NCHW): both the
    last and the second axis are tried, and the worse is kept."""
    info = np.iinfo(dtype)
    values = values.astype(np.float64)
    restored = (np.clip(np.round(values / scale) + zero_point, info.min, info.max) - zero_point) * scale
    noise, signal = (values - restored) ** 2, values ** 2
    axes = sorted({values.ndim - 1, 1}) if values.ndim >= 2 else [None]
    worst = SQNR_CAP_DB  # the whole tensor's ratio too: a wide channel clipped by a narrow range
    if signal.sum() > 0:
        worst = min(worst, float(10.0 * np.log10(signal.sum() / max(noise.sum(), 1e-30))))
    for axis in axes:
        if axis is None:
            per_channel_signal, per_channel_noise = np.array([signal.sum()]), np.array([noise.sum()])
        else:
            others = tuple(a for a in range(values.ndim) if a != axis)
            per_channel_signal, per_channel_noise = signal.sum(axis=others), noise.sum(axis=others)
        alive = per_channel_signal > 0
        if not alive.any():
            continue
        with np.errstate(divide="ignore"):
            ratios = 10.0 * np.log10(per_channel_signal[alive] / np.maximum(per_channel_noise[alive], 1e-30))
        worst = min(worst, float(np.mean(np.minimum(ratios, SQNR_CAP_DB))))
    return worst


def _tflite_consumers(model: bytes) -> dict[str, list[str]]:
    """Tensor name -> the output tensor names of the ops that read it (an op is named by its
    first output), in the float file."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    consumers: dict[str, list[str]] = {}
    for op in interpreter._get_ops_details():
        if op["op_name"] == "DELEGATE":
            continue
        for index in op["inputs"]:
            if int(index) >= 0:
                consumers.setdefault(names[int(index)], []).append(names[int(op["outputs"][0])])
    return consumers


def tflite_ranking(fp32_model: bytes, quantized_model: bytes, images: np.ndarray) -> list[Candidate]:
    """Every tensor ``quantized_model`` quantizes that the fp32 model also computes, with its
    SQNR (the float values quantized with the file's scale and zero point), worst first; for a
    file without such tensors (dynamic range: int8 weights, float activations), every hybrid op,
    ranked by the SQNR of its quantized weights."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    quantized = Interpreter(model_content=quantized_model)
    params: dict[str, tuple[float, int, Any]] = {}
    by_index = {t["index"]: t for t in quantized.get_tensor_details()}
    ops = [op for op in quantized._get_ops_details() if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE", "DELEGATE")]
    if not any(np.issubdtype(by_index[int(op["outputs"][0])]["dtype"], np.integer) for op in ops):
        return _weight_ranking(fp32_model, quantized, ops, by_index)
    for op in ops:
        for index in op["outputs"]:
            tensor = by_index.get(int(index))
            if tensor is None or not np.issubdtype(tensor["dtype"], np.integer):
                continue
            scales = tensor["quantization_parameters"]["scales"]
            if len(scales) == 1:
                params[tensor["name"]] = (float(scales[0]),
                                          int(tensor["quantization_parameters"]["zero_points"][0]),
                                          tensor["dtype"])
    floating = Interpreter(model_content=fp32_model, experimental_preserve_all_tensors=True,
                           experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    entry = floating.get_input_details()[0]
    floating.resize_tensor_input(entry["index"], [len(images), *images.shape[1:]])
    floating.allocate_tensors()
    floating.set_tensor(entry["index"], images.astype(np.float32))
    floating.invoke()
    consumers = _tflite_consumers(fp32_model)
    producers = {t["name"] for t in floating.get_tensor_details()}
    found = []
    for tensor in floating.get_tensor_details():
        if tensor["name"] in params and tensor["name"] in producers:
            try:
                values = floating.get_tensor(tensor["index"])
            except ValueError:
                continue
            ops_of = (tensor["name"], *consumers.get(tensor["name"], []))
            found.append(Candidate(tensor["name"], tuple(dict.fromkeys(ops_of)),
                                   sqnr_db(values, *params[tensor["name"]])))
    return sorted(found, key=lambda c: c.sqnr_db)


def _weight_ranking(fp32_model: bytes, quantized: Any, ops: list[dict[str, Any]],
                    by_index: dict[int, dict[str, Any]]) -> list[Candidate]:
    """(op output tensor name, SQNR dB of its int8 weights against the fp32 file's) of every
    op of a dynamic-range file that computes with integer weights, worst first."""
    from ai_edge_litert.interpreter import Interpreter

    floating = Interpreter(model_content=fp32_model)
    float_by_name = {t["name"]: t for t in floating.get_tensor_details()}
    found = []
    for op in ops:
        for index in op["inputs"]:
            tensor = by_index.get(int(index))
            if tensor is None or tensor["dtype"] != np.int8 or tensor["name"] not in float_by_name:
                continue
            try:
                weights = quantized.get_tensor(int(index)).astype(np.float64)
                reference = floating.get_tensor(float_by_name[tensor["name"]]["index"]).astype(np.float64)
            except ValueError:
                continue
            quant = tensor["quantization_parameters"]
            shape = [1] * weights.ndim
            scales = np.asarray(quant["scales"], np.float64)
            if len(scales) > 1:
                shape[quant["quantized_dimension"]] = len(scales)
            restored = (weights - np.asarray(quant["zero_points"]).reshape(shape)) * scales.reshape(shape)
            if restored.shape != reference.shape:
                continue
            noise = float(np.sum((reference - restored) ** 2))
            ratio = SQNR_CAP_DB if noise == 0 else min(SQNR_CAP_DB, 10 * np.log10(
                max(float(np.sum(reference ** 2)), 1e-30) / noise))
            name = by_index[int(op["outputs"][0])]["name"]
            found.append(Candidate(name, (name,), ratio))
            break
    return sorted(found, key=lambda c: c.sqnr_db)


def onnx_activations(model: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every node output of an ONNX model on ``images``, in its own shape (ONNX Runtime's
    ``qdq_loss_debug`` flattens them, which hides the channels), by tensor name."""
    import onnx
    import onnxruntime as ort

    graph_model = onnx.shape_inference.infer_shapes(onnx.load(str(model)))
    graph = graph_model.graph
    present = {o.name for o in graph.output}
    typed = {v.name: v for v in graph.value_info}
    for node in graph.node:
        for name in node.output:
            if name and name not in present and name in typed:
                graph.output.append(typed[name])
                present.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(graph_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {graph.input[0].name: images.astype(np.float32)})
    return dict(zip(names, values))


def onnx_ranking(float_model: Path, qdq_model: Path, images: np.ndarray) -> list[Candidate]:
    """Every tensor the QDQ model quantizes (a QuantizeLinear after a node), with its SQNR (the
    float model's values, matched by tensor name, quantized with the QDQ model's scale and zero
    point), its producer and the nodes that read its dequantized copy, worst first."""
    import onnx

    float_values = onnx_activations(float_model, images)
    graph = onnx.load(str(qdq_model)).graph
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    producer = {out: node.name for node in graph.node for out in node.output
                if node.op_type not in ("QuantizeLinear", "DequantizeLinear")}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for tensor in node.input:
            readers.setdefault(tensor, []).append(node)
    found = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in producer:
            continue
        tensor = node.input[0]
        scale = initializers.get(node.input[1])
        zero = initializers.get(node.input[2]) if len(node.input) > 2 else np.array(0, np.uint8)
        values = float_values.get(tensor)
        if scale is None or zero is None or values is None or np.size(scale) != 1:
            continue
        stacked = np.asarray(values)
        consumers = [reader.name for dq in readers.get(node.output[0], []) if dq.op_type == "DequantizeLinear"
                     for reader in readers.get(dq.output[0], []) if reader.op_type != "QuantizeLinear"]
        found.append(Candidate(tensor, tuple(dict.fromkeys([producer[tensor], *consumers])),
                               sqnr_db(stacked, float(scale), int(zero), zero.dtype)))
    return sorted(found, key=lambda c: c.sqnr_db)
