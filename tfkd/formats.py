"""Every export format: its file, what it is made from and how, and how it runs.

``FILES`` names each format's file; ``EXACT_FORMATS`` must match the Keras model to the
tolerance; ``REPAIRABLE`` formats can keep ops in float one by one (``tfkd.budget``).
``Builder`` makes any format of one float model into a folder, each from what it needs (the
SavedModel, the fp32 ``.tflite``, the fp32 ONNX file), with ops kept in float on request;
``runner`` runs a file in its own runtime. The quantizing itself is ``tfkd.quantize``'s.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from tfkd.errors import ModelError

FILES = {"saved_model": "saved_model", "fp32": "model_fp32.tflite", "fp16": "model_fp16.tflite",
         "dynamic": "model_dynamic.tflite", "int8": "model_int8.tflite",
         "litert_dynamic": "model_litert_dynamic.tflite", "litert_int8": "model_litert_int8.tflite",
         "litert_a16w8": "model_litert_a16w8.tflite", "onnx": "model.onnx",
         "onnx_int8": "model_int8.onnx"}
#: Formats that must match Keras to the tolerance (the others are quantized).
EXACT_FORMATS = ("saved_model", "fp32", "onnx")
#: Quantized formats whose ops can be kept in float one by one (the accuracy budget's repair).
REPAIRABLE = ("int8", "litert_dynamic", "litert_int8", "litert_a16w8", "onnx_int8")
#: Formats calibrated on training images.
CALIBRATED = ("int8", "litert_int8", "litert_a16w8", "onnx_int8")


def export_saved_model(model: Any, path: Path) -> None:
    """SavedModel with the ``serving_default`` signature (Keras's own exporter)."""
    model.export(str(path), format="tf_saved_model", verbose=False)


def convert_onnx(saved_model: Path, path: Path, opset: int = 17) -> None:
    """ONNX from the SavedModel with tf2onnx's own ``--saved-model`` converter, run as the
    documented command. (``from_function`` on the Keras model turns the normalization
    constants into extra graph inputs; ``from_keras`` does not handle Keras 3 models.)"""
    import subprocess

    command = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved_model),
               "--output", str(path), "--opset", str(opset)]
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if result.returncode < 0:  # the converter was stopped by a signal (Ctrl-C reaches it too)
        raise KeyboardInterrupt(f"tf2onnx stopped by signal {-result.returncode}")
    if result.returncode != 0 or not path.is_file():
        lines = [l for l in result.stderr.splitlines() if l.strip()] or ["no output"]
        raise ModelError(f"ONNX conversion failed (tf2onnx: {lines[-1][:300]})")



def runner(fmt: str, path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function from float32 pixel batches to logits, in the format's own runtime."""
    if fmt == "saved_model":
        import tensorflow as tf

        signature = tf.saved_model.load(str(path)).signatures["serving_default"]
        return lambda x: signature(images=tf.constant(x))["logits"].numpy()
    if fmt in ("onnx", "onnx_int8"):
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        outputs = [o.name for o in session.get_outputs()]
        index = outputs.index("logits") if "logits" in outputs else 0
        return lambda x: session.run(None, {name: x})[index]
    return tflite_runner(path)


def tflite_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """LiteRT's interpreter behind the ``serving_default`` signature; quantizes integer input
    and dequantizes integer output with the tensors' own scale and zero point."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    signature = interpreter.get_signature_runner("serving_default")
    details_in = signature.get_input_details()["images"]
    details_out = signature.get_output_details()["logits"]

    def run(x: np.ndarray) -> np.ndarray:
        if details_in["dtype"] != np.float32:
            scale, zero = details_in["quantization"]
            info = np.iinfo(details_in["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(details_in["dtype"])
        y = signature(images=x)["logits"]
        if details_out["dtype"] != np.float32:
            scale, zero = details_out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y

    return run




def io_types(fmt: str, path: Path) -> dict[str, str]:
    """The element types a file takes and returns (``{"input": "uint8", "output": "uint8"}``):
    what a device must feed it, read from the file itself."""
    if fmt == "saved_model":
        return {"input": "float32", "output": "float32"}
    if path.suffix == ".onnx":
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        names = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.UINT8: "uint8",
                 onnx.TensorProto.INT8: "int8", onnx.TensorProto.INT16: "int16"}
        return {"input": names.get(graph.input[0].type.tensor_type.elem_type, "other"),
                "output": names.get(graph.output[0].type.tensor_type.elem_type, "other")}
    from ai_edge_litert.interpreter import Interpreter

    signature = Interpreter(model_path=str(path)).get_signature_runner("serving_default")
    return {"input": np.dtype(signature.get_input_details()["images"]["dtype"]).name,
            "output": np.dtype(signature.get_output_details()["logits"]["dtype"]).name}


_FAILED_NODE = re.compile(r"Node number (\d+) \((\w+)\) failed to prepare")


class Builder:
    """Makes the formats of one float model into ``folder``: from the SavedModel (LiteRT's
    converter, tf2onnx), the fp32 ``.tflite`` (LiteRT Quantizer) or the fp32 ONNX file (ONNX
    Runtime's quantizer), each made once and shared. ``build(fmt, keep_float, name)`` writes a
    file (``name``, default the format's) with the given ops (by output tensor name for LiteRT,
    node name for ONNX) in float; ``ranking(fmt, file)`` orders a quantized file's ops by how much
    quantizing them costs, worst first (``tfkd.quantize``).

    A LiteRT file the interpreter cannot prepare (LiteRT's int16 ADD requires its inputs' scales
    in a range LiteRT Quantizer does not always respect) gets the op it names kept in float, and
    again, until it loads; ``runtime_float[fmt]`` lists those ops.
    """

    def __init__(self, folder: Path, saved_model: Path, calibration: np.ndarray, int8_io: str = "float32",
                 opset: int = 17, ranking_images: int = 64) -> None:
        self.folder, self.saved_model, self.calibration = folder, saved_model, calibration
        self.int8_io, self.opset, self.ranking_images = int8_io, opset, ranking_images
        self._fp32: bytes | None = None
        self._onnx: Path | None = None
        self.runtime_float: dict[str, list[str]] = {}

    def fp32_tflite(self) -> bytes:
        """The fp32 ``.tflite`` (made once)."""
        from tfkd import quantize

        if self._fp32 is None:
            self._fp32 = quantize.legacy_tflite(self.saved_model, "fp32")
        return self._fp32

    def fp32_onnx(self) -> Path:
        """The fp32 ONNX file (made once, as ``model.onnx`` in the folder)."""
        if self._onnx is None:
            self._onnx = self.folder / FILES["onnx"]
            if not self._onnx.is_file():
                convert_onnx(self.saved_model, self._onnx, self.opset)
        return self._onnx

    def build(self, fmt: str, keep_float: Sequence[str] = (), name: str | None = None) -> Path:
        """Writes ``fmt`` with ``keep_float`` ops in float; returns its path."""
        from tfkd import quantize

        path = self.folder / (name or FILES[fmt])
        if fmt == "saved_model":
            if path != self.saved_model:
                shutil.copytree(self.saved_model, path, dirs_exist_ok=True)
        elif fmt == "fp32":
            path.write_bytes(self.fp32_tflite())
        elif fmt in ("fp16", "dynamic", "int8"):
            path.write_bytes(self._loadable(fmt, list(keep_float), lambda keep: quantize.legacy_tflite(
                self.saved_model, fmt, self.calibration, self.int8_io, keep)))
        elif fmt in quantize.LITERT_RECIPES:
            path.write_bytes(self._loadable(fmt, list(keep_float), lambda keep: quantize.litert(
                self.fp32_tflite(), fmt, self.calibration, keep)))
        elif fmt == "onnx":
            if path != self.fp32_onnx():
                shutil.copyfile(self.fp32_onnx(), path)
        elif fmt == "onnx_int8":
            quantize.onnx_qdq(self.fp32_onnx(), path, self.calibration, keep_float)
        else:
            raise ValueError(f"unknown format {fmt!r}")
        return path

    def _loadable(self, fmt: str, keep: list[str], make: Callable[[list[str]], bytes]) -> bytes:
        """``make(keep)``, with every op LiteRT cannot prepare added to ``keep`` until it loads."""
        from ai_edge_litert.interpreter import Interpreter

        from tfkd.opcount import _stderr_of

        added: list[str] = []
        for _ in range(64):
            model = make(keep + added)
            interpreter = Interpreter(model_content=model)
            try:
                _stderr_of(interpreter.allocate_tensors)
                self.runtime_float[fmt] = added
                return model
            except RuntimeError as error:
                found = _FAILED_NODE.search(str(error))
                if not found:
                    raise ModelError(f"{fmt}: LiteRT cannot load the file ({str(error).splitlines()[0]})") from None
                op = interpreter._get_op_details(int(found.group(1)))
                names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
                name = names.get(int(op["outputs"][0]))
                if name is None or name in keep + added:
                    raise ModelError(f"{fmt}: LiteRT cannot prepare op {found.group(1)} "
                                     f"({found.group(2)}) even in float") from None
                added.append(name)
        raise ModelError(f"{fmt}: LiteRT still cannot load the file after keeping {len(added)} ops in float")

    def ranking(self, fmt: str, path: Path) -> list[Any]:
        """The quantized tensors of ``path`` (a build of ``fmt``), the noisiest first, with the
        ops to keep in float for each (``tfkd.quantize.Candidate``)."""
        from tfkd import quantize

        images = self.calibration[:self.ranking_images]
        if fmt == "onnx_int8":
            return quantize.onnx_ranking(self.fp32_onnx(), path, images)
        return quantize.tflite_ranking(self.fp32_tflite(), path.read_bytes(), images)
