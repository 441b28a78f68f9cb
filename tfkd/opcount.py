"""What a deployed file really runs in integer: op counts read from the runtimes themselves.

A file called "int8" may still compute much of its graph in float, and two runtimes' "int8"
files can be very different experiments:

- **LiteRT** (``.tflite``): every operator of the file with the types of its operands and
  results (``Interpreter._get_ops_details``). An op is *integer* when it computes on integer
  activations, *hybrid* when it computes on float activations with integer weights (dynamic
  range: the runtime quantizes the activations on the fly), *float* otherwise; QUANTIZE and
  DEQUANTIZE are *conversions*. The interpreter as the export times it also applies XNNPACK,
  its default CPU delegate, which takes the operators it has kernels for: the DELEGATE nodes
  say how many partitions it made and, walking back from each partition's outputs to its
  inputs, which operators it took; the others run on LiteRT's own (reference or optimized)
  kernels, with a hand-over at every partition boundary.
- **ONNX Runtime** (``.onnx``): the graph ONNX Runtime executes after its own optimizations
  (the model it writes with ``optimized_model_filepath``): a QDQ model's DequantizeLinear ->
  op -> QuantizeLinear groups become integer kernels (``QLinearConv``, ...) only where the CPU
  provider has one; everything else runs in float between a dequantize and a quantize.

No TensorFlow: the functions need only ``ai_edge_litert`` or ``onnx``/``onnxruntime``.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

CONVERSIONS_TFLITE = ("QUANTIZE", "DEQUANTIZE")
CONVERSIONS_ONNX = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
#: ONNX Runtime operators that compute on integers (the QLinear* family and the integer products).
INTEGER_ONNX = ("ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                "QGemm", "QAttention", "QOrderedMatMul")


def _integer(dtype: Any) -> bool:
    return np.issubdtype(np.dtype(dtype), np.integer)


def _summary(kinds: dict[str, Counter]) -> dict[str, Any]:
    return {"int_ops": sum(kinds["int"].values()), "hybrid_ops": sum(kinds["hybrid"].values()),
            "float_ops": sum(kinds["float"].values()), "conversions": sum(kinds["conversion"].values()),
            "float_kinds": dict(sorted(kinds["float"].items())),
            "int_kinds": dict(sorted(kinds["int"].items())),
            "hybrid_kinds": dict(sorted(kinds["hybrid"].items()))}


def _stderr_of(function: Any) -> tuple[Any, str]:
    """``function()`` with the process's stderr (the C++ runtimes' log) captured."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            result = function()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        return result, log.read().decode(errors="replace")


def tflite_ops(path: str | Path) -> dict[str, Any]:
    """Integer / hybrid / float / conversion op counts of a ``.tflite`` file (its main subgraph)
    and what XNNPACK takes of it when LiteRT's interpreter loads it with its default delegates:
    ``{"int_ops", "hybrid_ops", "float_ops", "conversions", "float_kinds", ..., "xnnpack":
    {"partitions", "delegated_ops", "ops", "not_delegated": {op kind: count}}}``."""
    from ai_edge_litert.interpreter import Interpreter

    def load() -> Any:
        interpreter = Interpreter(model_path=str(path))
        interpreter.allocate_tensors()  # applies the default delegates (XNNPACK)
        return interpreter

    interpreter, _ = _stderr_of(load)
    details = interpreter._get_ops_details()
    original = [op for op in details if op["op_name"] != "DELEGATE"]
    kinds: dict[str, Counter] = {k: Counter() for k in ("int", "hybrid", "float", "conversion")}
    for op in original:
        name = op["op_name"]
        operands = [t for t in op.get("operand_types", [])]
        results = [t for t in op.get("result_types", [])]
        if name in CONVERSIONS_TFLITE:
            kinds["conversion"][name] += 1
        elif results and all(_integer(t) for t in results) and any(_integer(t) for t in operands):
            kinds["int"][name] += 1
        elif any(_integer(t) for t in operands) and not any(_integer(t) for t in results) \
                and name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL",
                             "TRANSPOSE_CONV", "EMBEDDING_LOOKUP", "UNIDIRECTIONAL_SEQUENCE_LSTM"):
            kinds["hybrid"][name] += 1
        else:
            kinds["float"][name] += 1
    result = _summary(kinds)
    result["ops"] = len(original)
    result["xnnpack"] = _delegated(original, [op for op in details if op["op_name"] == "DELEGATE"])
    return result


def _delegated(original: list[dict[str, Any]], delegates: list[dict[str, Any]]) -> dict[str, Any]:
    """Which of ``original``'s operators the DELEGATE nodes replaced: for each partition, the
    producers of its outputs, walked back until its inputs."""
    producer = {int(t): i for i, op in enumerate(original) for t in op["outputs"]}
    taken: set[int] = set()
    for node in delegates:
        inputs = {int(t) for t in node["inputs"]}
        stack = [int(t) for t in node["outputs"]]
        seen: set[int] = set()
        while stack:
            tensor = stack.pop()
            if tensor in seen or tensor in inputs or tensor not in producer:
                continue
            seen.add(tensor)
            index = producer[tensor]
            if index not in taken:
                taken.add(index)
                stack.extend(int(t) for t in original[index]["inputs"] if int(t) >= 0)
    left = Counter(op["op_name"] for i, op in enumerate(original) if i not in taken)
    return {"partitions": len(delegates), "delegated_ops": len(taken), "ops": len(original),
            "not_delegated": dict(sorted(left.items()))}


def onnx_ops(path: str | Path) -> dict[str, Any]:
    """Integer / float / conversion op counts of the graph ONNX Runtime's CPU provider executes
    for an ``.onnx`` file (after its extended graph optimizations, which fuse QDQ groups into
    integer kernels where it has them)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as scratch:
        optimized = Path(scratch) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(optimized), load_external_data=False).graph
    kinds: dict[str, Counter] = {k: Counter() for k in ("int", "hybrid", "float", "conversion")}
    for node in graph.node:
        name = node.op_type
        if name in CONVERSIONS_ONNX:
            kinds["conversion"][name] += 1
        elif name.startswith("QLinear") or name in INTEGER_ONNX:
            kinds["int"][name] += 1
        else:
            kinds["float"][name] += 1
    result = _summary(kinds)
    result["ops"] = sum(sum(c.values()) for k, c in kinds.items() if k != "conversion")
    return result


def count(fmt_file: str | Path) -> dict[str, Any]:
    """``tflite_ops`` or ``onnx_ops`` by the file's suffix."""
    path = Path(fmt_file)
    if path.suffix == ".tflite":
        return tflite_ops(path)
    if path.suffix == ".onnx":
        return onnx_ops(path)
    raise ValueError(f"{path}: no op count for this kind of file")


def describe(counts: dict[str, Any]) -> str:
    """One line: '112 ops: 107 integer, 0 hybrid, 2 float (SOFTMAX), 3 conversions; XNNPACK:
    20 partitions, 94 of 112 ops'."""
    floats = ", ".join(f"{k} x{v}" for k, v in counts.get("float_kinds", {}).items())
    text = (f"{counts['ops']} ops: {counts['int_ops']} integer, {counts['hybrid_ops']} hybrid, "
            f"{counts['float_ops']} float{f' ({floats})' if floats else ''}, "
            f"{counts['conversions']} conversions")
    x = counts.get("xnnpack")
    if x:
        text += f"; XNNPACK: {x['delegated_ops']} of {x['ops']} ops in {x['partitions']} partition(s)"
    return text
