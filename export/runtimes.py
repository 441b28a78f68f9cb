"""Edge runtimes behind one interface, for ``predict.py`` and ``benchmark.py``.

Only numpy and ONNX Runtime or LiteRT (``ai-edge-litert``) are needed; TensorFlow is never
imported. Every tfkd model takes ``images``: float32 NHWC pixels in [0, 255] (a model exported
with ``--int8-io int8/uint8`` takes integers; this module quantizes the pixels for it) and gives
``logits``; another tool's classifier with one input and one output is run through those,
whatever their names (``NEEDS`` says what is refused).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

MODEL_SUFFIXES = (".onnx", ".tflite")
#: What the kit runs, said when a model is not that.
NEEDS = ("the kit runs an image classifier with one image input ([N, H, W, 3] or [N, 3, H, W] pixels "
         "in [0, 255]) and one output of class scores [N, classes], or an input named 'images' and "
         "an output named 'logits'")
#: Ops that pass a tensor through unchanged in value (looked through to find what made an output).
_ONNX_PASS = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast")
_TFLITE_PASS = ("RESHAPE", "SQUEEZE", "DEQUANTIZE", "QUANTIZE", "CAST")


def _varint(data, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data, start: int, end: int):
    """(field number, value) of the protobuf message in ``data[start:end]``: an int for a
    varint, (start, end) of the bytes for a length-delimited field, None for fixed-size ones."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = (pos, pos + size), pos + size
        elif wire in (1, 5):
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield key >> 3, value


def onnx_producers(path: Path) -> dict[str, tuple[str, list[str]]]:
    """Tensor name -> (op type, input names) of the node making it, read from the ONNX file's
    graph (ModelProto.graph = 7; GraphProto.node = 1; NodeProto input 1, output 2, op_type 4)
    without the onnx package."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        text = lambda span: bytes(data[span[0]:span[1]]).decode("utf-8", "replace")  # noqa: E731
        producers = {}
        for field, graph in _fields(data, 0, len(data)):
            if field != 7 or not isinstance(graph, tuple):
                continue
            for gfield, node in _fields(data, *graph):
                if gfield != 1 or not isinstance(node, tuple):
                    continue
                inputs, outputs, op = [], [], ""
                for nfield, value in _fields(data, *node):
                    if nfield == 1 and isinstance(value, tuple):
                        inputs.append(text(value))
                    elif nfield == 2 and isinstance(value, tuple):
                        outputs.append(text(value))
                    elif nfield == 4 and isinstance(value, tuple):
                        op = text(value)
                for name in outputs:
                    producers[name] = (op, inputs)
        return producers


def last_op(producers: dict, name, passing: tuple[str, ...]) -> str | None:
    """The op that made tensor ``name``, looking through ops that pass values through."""
    for _ in range(64):
        if name not in producers:
            return None
        op, inputs = producers[name]
        if op not in passing or not inputs:
            return op
        name = inputs[0]
    return None


class KitError(Exception):
    """A one-line problem with the user's input; ``exit_code`` is what the script exits with."""

    def __init__(self, message: str, exit_code: int = 3) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class KitParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``predict: error: ...``) with exit code 2."""

    def error(self, message: str) -> None:  # argparse's hook: never returns
        self.exit(2, f"{Path(self.prog).stem}: error: {message}\n")


def count(low: int):
    """argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {low}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: expected an integer >= {low}")
        return value

    return parse


class EdgeModel:
    """An exported classifier in ONNX Runtime (``.onnx``) or LiteRT (``.tflite``).

    Takes NHWC batches; a model whose input is NCHW (an ONNX model from PyTorch, say) gets them
    transposed. A model with a free height/width needs ``image_size``.
    """

    def __init__(self, path: str | Path, threads: int = 0, image_size: int | None = None,
                 xnnpack: bool = True) -> None:
        self.path = Path(path)
        self.xnnpack = xnnpack
        if not self.path.is_file():
            raise KitError(f"{self.path}: model file not found", 4)
        if self.path.suffix not in MODEL_SUFFIXES:
            raise KitError(f"{self.path}: expected a .onnx or .tflite model, got "
                           f"'{self.path.suffix or 'no extension'}'", 4)
        self.runtime = "onnxruntime" if self.path.suffix == ".onnx" else "litert"
        try:
            if self.runtime == "onnxruntime":
                self._load_onnx(threads)
            else:
                self._load_tflite(threads)
        except KitError:
            raise
        except Exception as error:  # the runtimes raise many types for a corrupt file
            raise KitError(f"{self.path}: {self.runtime} cannot load it ({type(error).__name__})", 4) from None
        shape = self.input_shape
        if len(shape) != 4:
            self._refuse(f"input {self.input_name!r} has shape {list(shape)}, not 4-D")
        self.layout = "NCHW" if shape[1] in (1, 3) and shape[3] not in (1, 3) else "NHWC"
        spatial = shape[2:4] if self.layout == "NCHW" else shape[1:3]
        self.channels = int(shape[1] if self.layout == "NCHW" else shape[3])
        if self.channels != 3:
            kind = {1: "grayscale (1-channel)", 4: "4-channel"}.get(self.channels, f"{self.channels}-channel")
            raise KitError(f"{self.path}: the model takes {kind} images (input {self.input_name!r}, "
                           f"shape {list(shape)}); the kit feeds 3-channel RGB pixels: export the model "
                           "with a 3-channel input (a grayscale model can repeat its channel inside)", 4)
        self.outputs_probabilities = self._ends_in_softmax()
        if any(d < 1 for d in spatial):
            if image_size is None:
                raise KitError(f"{self.path}: the model takes any image size (input shape {shape}); "
                               "pass --image-size N", 2)
            spatial = (image_size, image_size)
        elif image_size is not None and tuple(spatial) != (image_size, image_size):
            raise KitError(f"--image-size {image_size}: the model takes {spatial[0]}x{spatial[1]} "
                           "images only", 2)
        self.spatial = (int(spatial[0]), int(spatial[1]))

    def _refuse(self, problem: str) -> None:
        raise KitError(f"{self.path}: {problem}; {NEEDS}", 4)

    def _choose(self, kind: str, names: list[str], preferred: str) -> str:
        """The input or output the kit uses: the one named ``preferred``, else the only one."""
        if preferred in names:
            return preferred
        if len(names) != 1:
            self._refuse(f"{len(names)} {kind}s ({', '.join(repr(n) for n in names) or 'none'}) and none "
                         f"named {preferred!r}")
        return names[0]

    def _load_onnx(self, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no optimizer notes on the user's console
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        spec = inputs[self._choose("input", list(inputs), "images")]
        self.output_names = [self._choose("output", outputs, "logits")]  # the one output read
        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
        if spec.type not in types:
            self._refuse(f"input {spec.name!r} is {spec.type}, not float pixels")
        self.input_name = spec.name
        self.input_shape = tuple(d if isinstance(d, int) else -1 for d in spec.shape)
        self.input_dtype = types[spec.type]
        shape = next(o.shape for o in self.session.get_outputs() if o.name == self.output_names[0])
        if isinstance(shape, (list, tuple)) and len(shape) != 2:
            self._refuse(f"output {self.output_names[0]!r} has shape {list(shape)}, not [N, classes]")

    def _load_tflite(self, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        if self.xnnpack:  # LiteRT's default: the XNNPACK delegate takes the ops it has kernels for
            self.interpreter = Interpreter(model_path=str(self.path), num_threads=threads or None)
        else:  # LiteRT's own kernels only
            from ai_edge_litert.interpreter import OpResolverType

            self.interpreter = Interpreter(model_path=str(self.path), num_threads=threads or None,
                                           experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        signatures = list(self.interpreter.get_signature_list())
        if signatures:  # tfkd's files, and most converters': run through the signature
            key = self._choose("signature", signatures, "serving_default")
            self.signature = self.interpreter.get_signature_runner(key)
            inputs = self.signature.get_input_details()
            self.output_details = self.signature.get_output_details()
        else:  # a file without signatures (older converters): its input and output tensors
            self.signature = None
            self.interpreter.allocate_tensors()
            inputs = {d["name"]: d for d in self.interpreter.get_input_details()}
            self.output_details = {d["name"]: d for d in self.interpreter.get_output_details()}
        self.input_name = self._choose("input", list(inputs), "images")
        self.output_key = self._choose("output", list(self.output_details), "logits")
        self.output_names = [self.output_key]
        details = self.input_details = inputs[self.input_name]
        self.input_shape = tuple(int(d) for d in details["shape_signature"])
        self.input_dtype = details["dtype"]
        self.input_quantization = details["quantization"]
        if not (self.input_dtype == np.float32 or np.issubdtype(self.input_dtype, np.integer)):
            self._refuse(f"input {self.input_name!r} is {np.dtype(self.input_dtype).name}, not float32 or "
                         "quantized integer pixels")
        out = self.output_details[self.output_key]
        if len(out["shape_signature"]) != 2:
            self._refuse(f"output {self.output_key!r} has shape {[int(d) for d in out['shape_signature']]}, "
                         "not [N, classes]")

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        """Runs a LiteRT model without signatures on ``x`` (resizing its batch when needed)."""
        index = self.input_details["index"]
        current = next(d["shape"] for d in self.interpreter.get_input_details() if d["index"] == index)
        if tuple(current) != x.shape:
            self.interpreter.resize_tensor_input(index, list(x.shape), strict=False)
            self.interpreter.allocate_tensors()
        self.interpreter.set_tensor(index, x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output_details[self.output_key]["index"]).copy()

    def _ends_in_softmax(self) -> bool | None:
        """Whether the output read (``logits``, else the only one) is made by a Softmax op
        (a classifier exported with its softmax: its outputs are probabilities already); None
        when the graph cannot be read (then the outputs themselves tell, in ``probabilities``)."""
        try:
            if self.runtime == "onnxruntime":
                op = last_op(onnx_producers(self.path), self.output_names[0], _ONNX_PASS)
            else:
                ops = self.interpreter._get_ops_details()
                producers = {int(t): (o["op_name"], [int(i) for i in o["inputs"]]) for o in ops for t in o["outputs"]}
                op = last_op(producers, int(self.output_details[self.output_key]["index"]), _TFLITE_PASS)
        except Exception:  # an unreadable graph: decided from the outputs instead
            return None
        return None if op in (None, "DELEGATE") else op in ("Softmax", "SOFTMAX")

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) the model takes."""
        return self.spatial

    def check(self, images: np.ndarray) -> np.ndarray:
        """Validates an NHWC batch against the model's contract; returns it as float32."""
        expected = (*self.spatial, 3)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise KitError(f"input shape {tuple(images.shape)}: the model takes batches of "
                           f"(N, {', '.join(str(d) for d in expected)}) pixels")
        if not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)):
            raise KitError(f"input dtype {images.dtype}: expected float32 or uint8 pixels in [0, 255]")
        images = images.astype(np.float32)
        if not np.isfinite(images).all():
            raise KitError("input holds NaN or infinite pixels")
        if images.min() < 0 or images.max() > 255:
            raise KitError(f"pixel values span {images.min():g}..{images.max():g}: expected [0, 255]")
        return images

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits for a float32 [0, 255] NHWC batch."""
        if self.input_shape[0] == 1 and len(images) > 1:  # a model exported for batch 1 only
            return np.concatenate([self.logits(images[i:i + 1]) for i in range(len(images))])
        if self.layout == "NCHW":
            images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        if self.runtime == "onnxruntime":
            out = self.session.run(self.output_names, {self.input_name: images.astype(self.input_dtype)})[0]
            return self._scores(np.asarray(out, dtype=np.float32))
        x = images
        if self.input_dtype != np.float32:
            scale, zero = self.input_quantization
            info = np.iinfo(self.input_dtype)
            x = np.clip(np.round(images / scale + zero if scale else images), info.min, info.max).astype(self.input_dtype)
        if self.signature is not None:
            out = self.signature(**{self.input_name: x})[self.output_key]
        else:
            out = self._invoke(x)
        details = self.output_details[self.output_key]
        if details["dtype"] != np.float32:
            scale, zero = details["quantization"]
            out = (out.astype(np.float32) - zero) * scale if scale else out.astype(np.float32)
        return self._scores(out)

    def _scores(self, out: np.ndarray) -> np.ndarray:
        if out.ndim != 2:
            self._refuse(f"output {self.output_names[0]!r} gave shape {list(out.shape)}, not [N, classes]")
        return out


    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities for a float32 [0, 255] NHWC batch: the softmax of the outputs, or
        the outputs themselves when the model ends in a softmax (not softmaxed twice). When the
        graph cannot be read, outputs that are non-negative and sum to 1 count as probabilities."""
        out = np.asarray(self.logits(images), dtype=np.float32)
        done = self.outputs_probabilities
        if done is None:
            done = bool(len(out)) and out.min() >= 0 and np.allclose(out.sum(axis=-1), 1.0, atol=1e-3)
        return out if done else softmax(out)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)
