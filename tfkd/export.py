"""``python -m tfkd.export``: the student to SavedModel, TFLite (fp32, fp16, dynamic, int8) and
ONNX, each loaded back in its own runtime and checked against the Keras model.

The exported contract (every format): input ``images``, float32 NHWC pixels in [0, 255] at the
trained size, any batch size; normalization is inside the model; outputs ``logits`` and
``probabilities``. ``model_int8.tflite`` keeps float32 input and output by default
(``--int8-io uint8`` or ``int8`` makes them integer: pixels in, quantized logits out: the
full-integer model an NPU takes). ``model_int8.onnx`` is ONNX Runtime's recommended int8 for CNNs:
static QDQ quantization, signed int8 weights (per channel) and activations, calibrated on the same
training images as the TFLite int8 model. The card records how images are resized and cropped to
the input (``preprocessing``), which the ``export/`` kit repeats on a device.

Artifacts land in a temporary folder beside ``--out`` and replace it only once every format is
converted and verified, so ``--out`` never holds a partial export.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from tfkd.errors import ModelError

from tfkd.config import EXPORT_FORMATS as FORMATS
from tfkd.formats import (CALIBRATED, EXACT_FORMATS, FILES, REPAIRABLE, convert_onnx,
                          export_saved_model, runner, tflite_runner)


# ------------------------------------------------------------------------------ building
def deployable(student: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    """Wraps a student as the deployed contract: [0, 255] pixels in, normalization inside,
    ``{"logits", "probabilities"}`` out.

    A student that starts with a ``feed`` layer (a ``keras:`` network: it maps the run's
    normalized images onto the network's own convention) gets one affine layer from pixels to
    that convention instead of the normalization followed by its inverse, or none when the
    network takes pixels (MobileNetV3, EfficientNet rescale inside): the same function with up
    to four fewer elementwise ops, each of which a quantized file would otherwise requantize."""
    import keras

    images = keras.Input(tuple(student.input_shape[1:]), name="images")
    body, convention = _after_feed(student, mean, std)
    if convention is None:
        x = keras.layers.Normalization(mean=list(mean), variance=[s * s for s in std], name="normalize")(images)
    elif np.allclose(convention[0], 0.0, atol=1e-6) and np.allclose(convention[1], 1.0, rtol=1e-6):
        x = images
    else:
        x = keras.layers.Normalization(mean=list(convention[0]), variance=list(np.square(convention[1])),
                                       name="normalize")(images)
    logits = keras.layers.Identity(name="logits")(body(x)["logits"])
    probabilities = keras.layers.Softmax(name="probabilities")(logits)
    return keras.Model(images, {"logits": logits, "probabilities": probabilities}, name="deployable")


def _after_feed(student: Any, mean: Sequence[float], std: Sequence[float]) -> tuple[Any, Any]:
    """(the student from its feed layer's output on, the (mean, std) on the [0, 255] scale its
    body takes) when the student's first layer after its input is a ``feed`` layer; else
    (``student``, None)."""
    import keras

    try:
        feed = student.get_layer("feed")
    except ValueError:
        return student, None
    if feed not in student.layers[:2] or not isinstance(feed, (keras.layers.Normalization, keras.layers.Identity)):
        return student, None
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    if isinstance(feed, keras.layers.Identity):
        body_mean, body_std = mean, std
    else:  # pixels -> (p - mean) / std -> (x - m) / sqrt(v)
        m = np.asarray(feed.mean, np.float64).reshape(-1)
        v = np.asarray(feed.variance, np.float64).reshape(-1)
        body_mean, body_std = mean + m * std, std * np.sqrt(v)
    body = keras.Model(feed.output, student.output, name=f"{student.name}_body")
    return body, (body_mean.tolist(), body_std.tolist())


# ------------------------------------------------------------------------------ runtimes
def batch1_latency_ms(fn: Callable[[np.ndarray], Any], image: np.ndarray, runs: int = 50,
                      warmup: int = 5) -> float:
    """Median wall time of one single-image call, after warm-up, in milliseconds."""
    x = image[None].astype(np.float32)
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


class _Tally:
    """Agreement of one format with Keras, accumulated batch by batch."""

    def __init__(self) -> None:
        self.images = self.correct = self.agree = 0
        self.max_diff = 0.0

    def add(self, logits: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> None:
        """Counts one batch: the format's logits, Keras's, and the labels."""
        self.images += len(labels)
        self.correct += int(np.sum(logits.argmax(1) == labels))
        self.agree += int(np.sum(logits.argmax(1) == reference.argmax(1)))
        diff = float(np.abs(logits - reference).max()) if len(labels) else 0.0
        self.max_diff = math.nan if math.isnan(diff) or math.isnan(self.max_diff) else max(self.max_diff, diff)


def verify(out: Path, formats: Sequence[str], reference: Callable[[np.ndarray], np.ndarray],
           batches: Iterable[tuple[np.ndarray, np.ndarray]], tolerance: float,
           latency_runs: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Runs every artifact in its own runtime on ``batches`` (uint8 pixels, labels), next to
    ``reference`` (pixels -> the Keras model's logits); returns the per-format report and the
    Keras model's own figures. Batches stream: the test split is never held whole."""
    from tqdm import tqdm

    runners = {fmt: runner(fmt, out / FILES[fmt]) for fmt in formats}
    tallies = {fmt: _Tally() for fmt in formats}
    keras_tally = _Tally()
    largest, first = 0.0, None
    for images, labels in tqdm(batches, desc="verifying", unit="batch", leave=False):
        pixels = images.astype(np.float32)
        expected = np.asarray(reference(pixels))
        keras_tally.add(expected, expected, labels)
        largest = max(largest, float(np.abs(expected).max()) if len(labels) else 0.0)
        for fmt, fn in runners.items():
            tallies[fmt].add(np.asarray(fn(pixels)), expected, labels)
        if first is None and len(labels):
            first = pixels[0]
    if first is None:
        raise ModelError("no test images to verify the export on")
    report = {}
    for fmt in formats:
        path, tally = out / FILES[fmt], tallies[fmt]
        entry = {
            "file": FILES[fmt], "bytes": _size(path),
            "top1": tally.correct / tally.images,
            "agreement_with_keras": tally.agree / tally.images,
            "max_abs_logit_diff": tally.max_diff,
            "batch1_latency_ms": batch1_latency_ms(runners[fmt], first, latency_runs),
        }
        if fmt in ("onnx", "onnx_int8"):
            import onnx

            onnx.checker.check_model(onnx.load(str(path)), full_check=True)
            entry["onnx_checker"] = "passed (full_check)"
        if fmt in EXACT_FORMATS:
            # float32 round-off grows with the logits' magnitude: the tolerance is absolute up
            # to |logit| 1 and relative to the largest |logit| beyond.
            allowed = tolerance * max(1.0, largest)
            entry["allowed_logit_diff"] = allowed
            entry["within_tolerance"] = (entry["max_abs_logit_diff"] <= allowed
                                         and entry["agreement_with_keras"] == 1.0)
        report[fmt] = entry
    keras = {"top1": keras_tally.correct / keras_tally.images, "images": keras_tally.images,
             "first_image": first}
    return report, keras


# ------------------------------------------------------------------------------ the job
def load_student(path: str | Path) -> tuple[Any, Path]:
    """Loads ``student.keras`` (or a run folder holding it) in safe mode; returns the model and
    its run folder, where the normalization, labels and training metrics are."""
    from tfkd import io
    from tfkd.teacher import ReconstructionTeacher

    model, path = io.load_keras(path, "student.keras", "model")
    if isinstance(model, ReconstructionTeacher):
        raise ModelError(f"{path}: this is a teacher; export the student (student.keras) of a "
                         "distillation run")
    output = getattr(model, "output", None)
    if not isinstance(output, dict) or "logits" not in output:
        raise ModelError(f"{path}: not a tfkd student (expected a zoo model with logits)")
    if not (path.parent / "dataset.json").is_file():
        raise ModelError(f"{path.parent / 'dataset.json'}: missing; export reads the "
                         "normalization and labels from the model's run folder")
    return model, path.parent


def _describe_preprocessing(record: dict[str, Any]) -> str:
    if record.get("resize") == "center_crop":
        return (f"the centred square of {record['crop_fraction']:g} x the shorter side, resized to "
                f"{record['size']}x{record['size']} (bilinear, antialiased)")
    if record.get("resize") == "stretch":
        return f"the whole image resized to {record['size']}x{record['size']} (bilinear, antialiased)"
    return "not recorded"


def _pt(value: Any) -> str:
    return "—" if value is None else f"{value:+.2f}"


def _ops_cell(entry: dict[str, Any]) -> str:
    ops = entry.get("ops")
    if not ops:
        return "—"
    hybrid = f" + {ops['hybrid_ops']} hybrid" if ops["hybrid_ops"] else ""
    return f"{ops['int_ops']}{hybrid} / {ops['float_ops']}"


def _delegate_cell(entry: dict[str, Any]) -> str:
    xnn = (entry.get("ops") or {}).get("xnnpack")
    if not xnn:
        return "—"
    return f"{xnn['delegated_ops']}/{xnn['ops']} in {xnn['partitions']}"


def _model_card_markdown(card: dict[str, Any]) -> str:
    rows = ["| format | file | in / out | size (KiB) | test top-1 | drop vs fp32 (pt, test) | "
            "drop (pt, validation) | budget | integer / float ops | XNNPACK ops, partitions | "
            "agreement with Keras | max abs logit diff | batch-1 latency (ms) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    notes = []
    for fmt, entry in card["formats"].items():
        diff = entry["max_abs_logit_diff"]
        record = entry.get("budget")
        verdict = "—" if not record else ("within" if record["within_budget"] else "**MISSED**")
        if record and record.get("kept_float"):
            verdict += f" ({len(record['float_ops'])} op(s) in float)"
        io_types = entry.get("io") or {}
        rows.append(f"| {fmt} | `{entry['file']}` | {io_types.get('input', '?')} / {io_types.get('output', '?')} | "
                    f"{entry['bytes'] / 1024:.1f} | {entry['top1'] * 100:.2f}% | {_pt(-entry.get('drop_pt', 0.0))} | "
                    f"{_pt(None if not record else -record['drop_pt'])} | {verdict} | {_ops_cell(entry)} | "
                    f"{_delegate_cell(entry)} | {entry['agreement_with_keras'] * 100:.2f}% | "
                    f"{'not finite' if diff is None else f'{diff:.2e}'} | {entry['batch1_latency_ms']:.3f} |")
        ops = entry.get("ops") or {}
        if fmt not in EXACT_FORMATS and ops:
            floats = ", ".join(f"{k} x{v}" for k, v in ops.get("float_kinds", {}).items()) or "none"
            line = f"- `{entry['file']}`: {ops['int_ops']} ops on integers"
            if ops["hybrid_ops"]:
                line += f", {ops['hybrid_ops']} hybrid (int8 weights, float activations)"
            line += f", {ops['float_ops']} in float ({floats}), {ops['conversions']} conversions"
            xnn = ops.get("xnnpack")
            if xnn:
                left = ", ".join(f"{k} x{v}" for k, v in xnn["not_delegated"].items()) or "none"
                line += (f"; XNNPACK took {xnn['delegated_ops']} of {xnn['ops']} ops in "
                         f"{xnn['partitions']} partition(s), LiteRT's own kernels the rest ({left})")
            if record and record.get("kept_float"):
                before = record.get("unrepaired", {})
                line += (f"; kept in float to hold the budget: {len(record['kept_float'])} tensor(s), "
                         f"{len(record['float_ops'])} op(s) "
                         f"(unrepaired: {before.get('top1', 0) * 100:.2f}% validation, "
                         f"{before.get('bytes', 0) / 1024:.1f} KiB, {before.get('batch1_latency_ms', 0):.3f} ms)")
            if entry.get("kept_float_for_runtime"):
                line += (f"; {len(entry['kept_float_for_runtime'])} op(s) in float because LiteRT "
                         "cannot prepare them quantized")
            notes.append(line)
    keras_entry = card["keras"]
    rows.append(f"| keras (reference) | `student.keras` | float32 / float32 | | {keras_entry['top1'] * 100:.2f}% | "
                f"0 | 0 | | | | 100% | 0 | {keras_entry['batch1_latency_ms']:.3f} |")
    contract = card["input"]
    training = card.get("training", {})
    warnings = [f"> **WARNING**: {w}" for w in card.get("warnings", [])]
    budget = card.get("max_drop_pt")
    return "\n".join([
        f"# Model card: {card['model']}", "", *(warnings + [""] if warnings else []),
        f"A {card['model']} image classifier for the {card['dataset']} classes, trained by tfkd "
        f"(method `{training.get('method', 'n/a')}`).", "",
        "## Input and output", "",
        f"- input `images`: {contract['dtype']} {contract['layout']} {contract['shape']}, pixels in "
        f"{contract['range']}; normalization is inside the model. Files with integer input "
        "(column in / out) take pixels quantized with the input tensor's scale and zero point and "
        "return quantized logits",
        *([f"- `--int8-io` ({card['int8_io']}) sets the input/output type of `model_int8.tflite` only"]
          if card.get("int8_io") else []),
        f"- preprocessing: {_describe_preprocessing(card.get('preprocessing', {}))}",
        "- outputs: `logits` and `probabilities` (softmax), one per class of `labels.txt`",
        f"- normalization: mean {card['normalization']['mean']}, std {card['normalization']['std']}",
        "", "## Verification on the test split", "",
        f"{card['test_images']} test images; fp32 formats must match Keras within "
        f"{card['tolerance']:g} (max abs logit diff, relative to the largest |logit| above 1) with "
        "100% top-1 agreement. Budget: a quantized format may lose "
        + (f"{budget:g} pt of validation top-1 against the float model (Keras: "
           f"{(keras_entry.get('val_top1') or 0) * 100:.2f}% on validation)" if budget is not None
           else "any amount (no budget)") + ".", "",
        *rows, "", "## What runs in integer", "",
        *(notes or ["No quantized file."]), "", "## Training", "", "```json", json.dumps(training, indent=2), "```", "",
        f"Labels: {', '.join(card['labels'])}", ""])


def check_options(settings: Any) -> None:
    """Refuses bad export settings (``ExportConfig``) with ``ConfigError`` (exit 2), naming the
    command-line flag, before anything is loaded."""
    from tfkd.errors import ConfigError

    formats = list(settings.formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"--formats {','.join(formats) or repr('')}: expected some of {', '.join(FORMATS)}")
    checks = [(7 <= settings.opset <= 21, "--opset", settings.opset, "an ONNX opset from 7 to 21"),
              (1 <= settings.representative <= 100_000, "--representative", settings.representative,
               "an integer from 1 to 100000"),
              (settings.int8_io in ("float32", "int8", "uint8"), "--int8-io", settings.int8_io,
               "float32, int8 or uint8"),
              (math.isfinite(settings.tolerance) and settings.tolerance > 0, "--tolerance",
               settings.tolerance, "a finite number > 0"),
              (settings.max_test_images >= 0, "--max-test-images", settings.max_test_images, "an integer >= 0"),
              (settings.max_drop is None or (math.isfinite(settings.max_drop) and 0 <= settings.max_drop <= 100),
               "--max-drop", settings.max_drop, "points of top-1 from 0 to 100"),
              (settings.max_val_images >= 0, "--max-val-images", settings.max_val_images, "an integer >= 0"),
              (settings.latency_runs >= 1, "--latency-runs", settings.latency_runs, "an integer >= 1")]
    for ok, flag, value, expected in checks:
        if not ok:
            raise ConfigError(f"{flag} {value!r}: expected {expected}")


def settings_of(settings: Any = None, formats: Sequence[str] | None = None, **changes: Any) -> Any:
    """An ``ExportConfig``: ``settings`` (default: the defaults) with ``formats`` and any other
    fields in ``changes`` replaced."""
    import dataclasses

    from tfkd.config import ExportConfig

    settings = settings if settings is not None else ExportConfig()
    if formats is not None:
        changes["formats"] = list(formats)
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(ExportConfig)})
    if unknown:
        raise TypeError(f"unknown export settings {unknown}")
    return dataclasses.replace(settings, **changes)


#: What marks a folder as a tfkd export (``model_card.json`` holds it with the files written).
MARKER = "tfkd_export"


def previous_export(out: Path) -> list[str] | None:
    """The entries a previous tfkd export wrote in ``out`` (None when ``out`` is no tfkd export).
    An export from before the manifest existed is recognized by its model card."""
    for name in ("model_card.json", "compress_report.json"):  # tfkd.export's, tfkd.compress's
        try:
            card = json.loads((out / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(card, dict):
            continue
        if isinstance(card.get(MARKER), dict):
            return [str(f) for f in card[MARKER].get("files", [])]
        if name == "model_card.json" and "formats" in card and "labels" in card:  # before the marker
            return [*FILES.values(), "labels.txt", "model_card.json", "model_card.md"]
        if name == "compress_report.json" and "compressed_int8" in card:
            return [FILES["int8"], "labels.txt", "compress_report.json"]
    return None


def check_out(out: str | Path, model_path: str | Path | None = None) -> Path:
    """Where an export may go: a new or empty folder, or a previous tfkd export (whose own files
    are replaced; anything else in it is left alone). Raises ``ConfigError`` naming the folder
    otherwise, before anything is converted; returns ``out`` as an absolute path."""
    from tfkd import rundir
    from tfkd.errors import ConfigError

    out = Path(os.path.abspath(out))
    problem = rundir.folder_problem(str(out))
    if problem:
        raise ConfigError(f"--out {out}: {problem}")
    if model_path is not None:
        source = Path(os.path.abspath(model_path))
        source_dir = source if source.is_dir() else source.parent
        if out == source_dir or source_dir.is_relative_to(out):
            raise ConfigError(f"--out {out}: holds the model being exported ({source}); choose a "
                              "new folder, e.g. beside it")
    if out.is_dir() and any(out.iterdir()) and previous_export(out) is None:
        raise ConfigError(f"--out {out}: not empty and not a tfkd export (no model_card.json of "
                          "one): tfkd never writes over other files; choose a new or empty folder")
    return out


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def training_data(run_dir: Path, data_dir: str | None) -> Any:
    """The dataset of the run that trained the student, with its splits: the settings the
    distill stage recorded in ``run.json`` (else the folder's ``config.yaml``)."""
    import dataclasses

    from tfkd import config as config_lib
    from tfkd import data as data_lib
    from tfkd import rundir
    from tfkd.errors import ConfigError

    try:
        recorded = rundir.load_records(run_dir).get("distill", {}).get("settings", {})
        if (run_dir / "config.yaml").is_file():
            cfg = config_lib.load(str(run_dir / "config.yaml"))
        else:
            info = rundir.read_dataset_record(run_dir) or {}
            cfg = config_lib.load(dotlist=[f"data.dataset={info.get('dataset', 'digits')}"])
    except ConfigError as error:
        raise ModelError(f"the model's run folder: {error}") from None
    fields = {f.name for f in dataclasses.fields(cfg.data)}
    changes = {key[len("data."):]: value for key, value in recorded.items()
               if key.startswith("data.") and key[len("data."):] in fields}
    if data_dir:
        changes["data_dir"] = data_dir
    seed = recorded.get("seed", cfg.seed)
    return data_lib.load(dataclasses.replace(cfg.data, **changes), seed)


def export(model_path: str | Path, out: str | Path, formats: Sequence[str] | None = None, *,
           settings: Any = None, data_dir: str | None = None, data: Any = None,
           **changes: Any) -> dict[str, Any]:
    """Converts, verifies and writes every requested format to ``out``; returns the model card.

    ``settings`` is the ``export`` section (``ExportConfig``; default: its defaults), with
    ``formats`` and any other of its fields given as keywords replaced (``int8_io="uint8"``).
    ``data`` (a ``tfkd.data.Data``) saves reloading the dataset when the caller has it; by
    default it is rebuilt as the student's training run had it, with the same splits.
    ``out`` must be new, empty or a previous tfkd export (``check_out``). Raises
    ``ExportError`` (and writes nothing) when an fp32 format disagrees with Keras.
    """
    from tfkd import precision, rundir

    source = Path(model_path)
    with rundir.reading(source if source.is_dir() else source.parent, "python -m tfkd.export " + " ".join(sys.argv[1:])), \
            precision.policy_scope("float32"):  # exports are float32, whatever a run trained in
        return _export(model_path, out, settings_of(settings, formats, **changes), data_dir, data)


def _export(model_path: str | Path, out: str | Path, settings: Any, data_dir: str | None,
            data: Any) -> dict[str, Any]:
    from tfkd import health, opcount, rundir
    from tfkd.errors import ConfigError, ExportError
    from tfkd.formats import Builder, io_types

    check_options(settings)
    formats = list(settings.formats)
    out = check_out(out, model_path)
    student, run_dir = load_student(model_path)
    try:
        info = rundir.read_dataset_record(run_dir) or {}
        mean, std, class_names = info["mean"], info["std"], info["class_names"]
    except (ConfigError, KeyError, TypeError) as error:
        raise ModelError(f"{run_dir / 'dataset.json'}: damaged ({error}); it must hold the "
                         "normalization and class names tfkd.train wrote") from None
    if data is None:
        data = training_data(run_dir, data_dir)
    model = deployable(student, mean, std)

    def keras_logits(pixels: np.ndarray) -> np.ndarray:
        return model(pixels, training=False)["logits"].numpy()

    for stale in rundir.remove_stale_temporaries(out.parent, out.name):
        print(f"tfkd: removed {stale}, left by an export that was killed")
    tmp = out.parent / f".tmp-{os.getpid()}-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        export_saved_model(model, tmp / FILES["saved_model"])
        calibration = data.sample("train", settings.representative, seed=0) \
            if any(f in CALIBRATED for f in formats) else np.zeros((0, *data.image_shape), np.uint8)
        builder = Builder(tmp, tmp / FILES["saved_model"], calibration, settings.int8_io, settings.opset)
        budgets = build_formats(builder, formats, settings, data, keras_logits)
        report, keras = verify(tmp, formats, keras_logits,
                               data.pixel_batches("test", 256, settings.max_test_images),
                               settings.tolerance, settings.latency_runs)
        keras_latency = batch1_latency_ms(keras_logits, keras.pop("first_image"), settings.latency_runs)
        for fmt in ("saved_model", "onnx"):
            if fmt not in formats:
                path = tmp / FILES[fmt]
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        bad = {f: e for f, e in report.items() if e.get("within_tolerance") is False}
        if bad:
            detail = "; ".join(f"{f}: max abs logit diff {e['max_abs_logit_diff']:.2e} (allowed "
                               f"{e['allowed_logit_diff']:.2e}), agreement "
                               f"{e['agreement_with_keras'] * 100:.2f}%" for f, e in bad.items())
            raise ExportError(f"{', '.join(bad)} disagree with the Keras model beyond {settings.tolerance:g} "
                              f"({detail}); nothing was written")
        for fmt, entry in report.items():
            path = tmp / FILES[fmt]
            entry["drop_pt"] = (keras["top1"] - entry["top1"]) * 100.0
            entry["io"] = io_types(fmt, path)
            if path.suffix in (".tflite", ".onnx"):
                entry["ops"] = opcount.count(path)
            if fmt in budgets:
                entry["budget"] = budgets[fmt]
            if builder.runtime_float.get(fmt):
                entry["kept_float_for_runtime"] = builder.runtime_float[fmt]
        try:
            training = json.loads((run_dir / "metrics.json").read_text()) \
                if (run_dir / "metrics.json").is_file() else {}
        except (OSError, ValueError):
            training = {}  # the metrics are for the card only: a damaged file is left out
        training.pop("stages", None)
        warnings = [*training.get("warnings", []), *health.accuracy_warnings(
            "the exported model", keras["top1"], data.test_labels[:keras["images"]], "test"),
            *budget_warnings(report, settings.max_drop)]
        files = export_files(formats)
        card = finite({
            "model": student.name, "dataset": info.get("dataset"), "labels": class_names,
            "input": {"name": "images", "dtype": "float32", "layout": "NHWC",
                      "shape": [None, *data.image_shape], "range": "[0, 255]",
                      "int8_note": "each file's own input and output types are under formats.<format>.io; "
                                   "an integer input takes pixels quantized with the input tensor's "
                                   "scale and zero point"},
            "preprocessing": info.get("preprocessing", data.geometry.record()),
            "outputs": ["logits", "probabilities"],
            "int8_io": settings.int8_io if "int8" in formats else None,  # model_int8.tflite's, if written
            "onnx_opset": settings.opset,
            "normalization": {"mean": mean, "std": std}, "tolerance": settings.tolerance,
            "max_drop_pt": settings.max_drop,
            "test_images": int(keras["images"]), "representative_images": int(len(calibration)),
            "keras": {"top1": keras["top1"], "batch1_latency_ms": keras_latency,
                      "val_top1": budgets.get("_reference", {}).get("top1")},
            "formats": report, "warnings": warnings, "training": training, "source": str(Path(model_path)),
            MARKER: {"version": 1, "files": files},
        })
        (tmp / "labels.txt").write_text("\n".join(class_names) + "\n")
        (tmp / "model_card.json").write_text(json.dumps(card, indent=2, allow_nan=False) + "\n")
        (tmp / "model_card.md").write_text(_model_card_markdown(card))
        for leftover in tmp.glob(".trial-*"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        record = publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    said = describe_replacement(record)
    if said:
        print(f"tfkd: note: {out}: {said}", flush=True)
    return card


def val_top1(fn: Callable[[np.ndarray], np.ndarray], data: Any, limit: int) -> float:
    """Top-1 of ``fn`` (pixels -> logits) on the validation split (its first ``limit`` images
    when ``limit`` > 0), streamed batch by batch."""
    correct = total = 0
    for images, labels in data.pixel_batches("val", 256, limit):
        correct += int(np.sum(np.asarray(fn(images.astype(np.float32))).argmax(1) == labels))
        total += len(labels)
    return correct / max(total, 1)


def build_formats(builder: Any, formats: Sequence[str], settings: Any, data: Any,
                  keras_logits: Callable[[np.ndarray], np.ndarray]) -> dict[str, dict[str, Any]]:
    """Builds every format into the builder's folder. A quantized format is scored on the
    validation split against the float (Keras) model; one that loses more than
    ``settings.max_drop`` points is repaired when it can be (``tfkd.budget``: its noisiest ops
    kept in float) and flagged when it still misses. Returns each quantized format's budget
    record (and the reference under ``_reference``); empty without a validation split or budget."""
    from tfkd import budget

    checked = settings.max_drop is not None and data.count("val") > 0
    if not checked:
        for fmt in formats:
            builder.build(fmt)
        if settings.max_drop is not None and any(f not in EXACT_FORMATS for f in formats):
            print("tfkd: note: no validation split: the accuracy budget is not checked (the test "
                  "split is never used for it)", flush=True)
        return {}
    reference = val_top1(keras_logits, data, settings.max_val_images)
    records: dict[str, dict[str, Any]] = {"_reference": {"top1": reference}}
    for fmt in formats:
        if fmt in EXACT_FORMATS:
            builder.build(fmt)
            continue
        trials: list[Path] = []

        def build(keep: Sequence[str], fmt: str = fmt) -> Path:
            trials.append(builder.build(fmt, keep, name=f".trial-{len(trials)}-{FILES[fmt]}"))
            return trials[-1]

        def score(path: Path, fmt: str = fmt) -> float:
            return val_top1(runner(fmt, path), data, settings.max_val_images)

        def ranking(path: Path, fmt: str = fmt) -> list[str]:
            return builder.ranking(fmt, path) if fmt in REPAIRABLE else []

        chosen, repair = budget.search(build, score, reference, settings.max_drop, ranking,
                                       lambda message, fmt=fmt: print(f"tfkd: {fmt}: {message}", flush=True))
        record = repair.record()
        record["repairable"] = fmt in REPAIRABLE
        if repair.kept_float:  # what keeping ops in float cost
            first = trials[0]
            image = data.sample("val", 1, seed=0)[0]
            record["unrepaired"] = {"bytes": _size(first), "top1": repair.tried[0]["top1"],
                                    "batch1_latency_ms": batch1_latency_ms(runner(fmt, first), image,
                                                                           settings.latency_runs)}
            print(f"tfkd: {fmt}: {len(repair.kept_float)} tensor(s) kept in float ({len(repair.float_ops)} "
                  f"ops): validation top-1 "
                  f"{repair.top1:.2%}, {repair.drop_pt:.2f} pt below the float model"
                  + ("" if repair.within_budget else f", still over the {settings.max_drop:g}-pt budget"),
                  flush=True)
        os.replace(chosen, builder.folder / FILES[fmt])
        for trial in trials:
            if trial.exists():
                trial.unlink()
        records[fmt] = record
    return records


def budget_warnings(report: dict[str, dict[str, Any]], max_drop: float | None) -> list[str]:
    """One sentence per quantized format that misses the accuracy budget."""
    found = []
    for fmt, entry in report.items():
        record = entry.get("budget")
        if record and not record["within_budget"]:
            found.append(f"{fmt} loses {record['drop_pt']:.2f} pt of validation top-1 against the "
                         f"float model, over the {max_drop:g}-pt budget"
                         + (f" even with {len(record['float_ops'])} op(s) kept in float"
                            if record.get("kept_float") else
                            "" if record.get("repairable") else " (its ops cannot be kept in float one by one)"))
    return found


#: What ``export/benchmark.py`` writes beside the models it timed: stale once they are replaced.
KIT_REPORTS = ("benchmark.json", "benchmark.png")


def export_files(formats: Sequence[str]) -> list[str]:
    """The entries an export of ``formats`` writes (its manifest)."""
    return sorted([FILES[f] for f in formats] + ["labels.txt", "model_card.json", "model_card.md"])


def replacement(out: Path, new: Iterable[str]) -> dict[str, list[str]]:
    """What writing the entries ``new`` into ``out`` does to what is there: the previous export's
    files it removes (``removed``: not written again), the kit's timing reports of the replaced
    models it keeps though they are stale (``stale``), and the other entries it leaves as they
    are (``kept``: the user's)."""
    record: dict[str, list[str]] = {"removed": [], "stale": [], "kept": []}
    if not out.is_dir():
        return record
    ours = set(previous_export(out) or [])
    entries = {p.name for p in out.iterdir() if not p.name.startswith((".tmp-", ".old-"))}
    record["removed"] = sorted((ours & entries) - set(new))
    record["stale"] = sorted(n for n in KIT_REPORTS if n in entries - ours)
    record["kept"] = sorted(entries - ours - set(new) - set(KIT_REPORTS))
    return record


def describe_replacement(record: dict[str, list[str]], short: bool = False) -> str:
    """One sentence on ``replacement``'s record ("" when there was no previous file)."""
    def names(items: list[str]) -> str:
        return ", ".join(items[:6]) + (f" and {len(items) - 6} more" if len(items) > 6 else "")

    parts = []
    if record["removed"]:
        parts.append(f"removed {len(record['removed'])} file(s) of the previous export that this one does "
                     f"not write: {names(record['removed'])}")
    if record["stale"]:
        parts.append(f"kept {names(record['stale'])}, " + ("stale" if short else
                     "export/benchmark.py's timings of the previous files, now stale (run it again)"))
    if record["kept"] and not short:
        parts.append(f"left {len(record['kept'])} other file(s) as they are: {names(record['kept'])}")
    return "; ".join(parts)


def publish(tmp: Path, out: Path) -> dict[str, list[str]]:
    """Moves the finished export in ``tmp`` onto ``out``. A previous export there is replaced as
    late as possible (its own files only: anything else a user put there stays), and the moves
    are never cut short by Ctrl-C. Returns what became of what was there (``replacement``)."""
    from tfkd import cli

    with cli.deferred_interrupts():
        if not out.exists():
            os.replace(tmp, out)
            return {"removed": [], "stale": [], "kept": []}
        record = replacement(out, [p.name for p in tmp.iterdir()])
        ours = set(previous_export(out) or [])
        entries = {p.name for p in out.iterdir()}
        foreign = {e for e in entries - ours if not e.startswith((".tmp-", ".old-"))}
        if not foreign:  # the whole folder is ours: swap it
            old = out.parent / f".old-{os.getpid()}-{out.name}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
            return record
        new = {p.name for p in tmp.iterdir()}
        retired = []
        for name in sorted(new | (ours & entries)):
            target = out / name
            if target.exists() or target.is_symlink():
                aside = out / f".old-{os.getpid()}-{name}"
                os.replace(target, aside)
                retired.append(aside)
            if name in new:
                os.replace(tmp / name, target)
        for path in retired:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return record


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m tfkd.export``."""
    from tfkd import cli

    parser = cli.Parser(
        prog="python -m tfkd.export",
        description="Export a trained student to SavedModel, TFLite (fp32, fp16, dynamic-range, "
                    "int8) and ONNX; verify every file in its own runtime against Keras on the "
                    "test split; write labels.txt and a model card.",
        epilog="Exit codes: 0 done, 2 bad option (or --out holds other files), 3 bad data, 4 bad "
               "model file, 6 an fp32 format disagrees with Keras (nothing written), 130 "
               "interrupted (nothing written).")
    parser.add_argument("model", help="student.keras, or the run folder holding it")
    parser.add_argument("--out", required=True,
                        help="output folder: new, empty, or a previous export (its files are "
                             "replaced once the whole export succeeded; other files stay)")
    parser.add_argument("--formats", help=f"comma-separated subset of {','.join(FORMATS)} (default: all)")
    parser.add_argument("--data-dir", help="dataset folder, if it moved since training")
    parser.add_argument("--opset", type=int, help="ONNX opset (default 17)")
    parser.add_argument("--representative", type=cli.positive_int,
                        help="training images used to calibrate the int8 models (default 500)")
    parser.add_argument("--int8-io", choices=("float32", "int8", "uint8"),
                        help="input/output type of model_int8.tflite (default float32; uint8 or "
                             "int8: a full-integer model for an NPU)")
    parser.add_argument("--tolerance", type=cli.positive_float,
                        help="max abs logit difference allowed for fp32 formats, relative to the "
                             "largest |logit| when that exceeds 1 (default 1e-4)")
    parser.add_argument("--max-test-images", type=cli.non_negative_int,
                        help="verify on the first N test images only (default: all)")
    parser.add_argument("--latency-runs", type=cli.positive_int, help="timed batch-1 calls per format (default 50)")
    parser.add_argument("--max-drop", type=cli.points_or_none, metavar="PT",
                        help="accuracy budget: points of validation top-1 a quantized format may lose "
                             "against the float model; one that loses more keeps its noisiest ops in "
                             "float until it holds, else it is written and flagged; none: every op quantized, "
                             "nothing checked (default 1.0)")
    parser.add_argument("--max-val-images", type=cli.non_negative_int,
                        help="score the budget on the first N validation images (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="export.KEY=VALUE",
                        help="an export.* config key (python -m tfkd.train --help lists them), e.g. "
                             "--set export.int8_io=uint8; the flags above win")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's own log")
    return parser


def settings_from_args(args: argparse.Namespace) -> Any:
    """The ``ExportConfig`` of the command line: defaults, then ``--set export.*`` items, then
    the flags. Raises ``ConfigError`` (exit 2) naming a bad key or value."""
    from tfkd import cli, config as config_lib
    from tfkd.errors import ConfigError

    for item in args.set:
        if not item.strip().startswith("export."):
            raise ConfigError(f"--set {item!r}: tfkd.export takes export.* keys (e.g. export.int8_io=uint8)")
    settings = config_lib.load(dotlist=list(args.set)).export
    flags = {"opset": args.opset, "representative": args.representative, "int8_io": args.int8_io,
             "tolerance": args.tolerance, "max_test_images": args.max_test_images,
             "latency_runs": args.latency_runs, "max_drop": args.max_drop,
             "max_val_images": args.max_val_images}
    formats = None if args.formats is None else [f.strip() for f in args.formats.split(",") if f.strip()]
    changes = {k: v for k, v in flags.items() if v is not None}
    if args.max_drop == cli.NONE:
        changes["max_drop"] = None
    settings = settings_of(settings, formats, **changes)
    check_options(settings)
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    from tfkd import cli

    def body() -> int:
        args = build_parser().parse_args(argv)
        settings = settings_from_args(args)
        out = check_out(args.out, args.model)
        before = replacement(out, export_files(settings.formats))  # said again in the summary
        cli.import_tensorflow(args.verbose)
        card = export(args.model, out, settings=settings, data_dir=args.data_dir)
        print(Path(out, "model_card.md").read_text())
        said = describe_replacement(before, short=True)
        print(f"tfkd: exported {len(card['formats'])} formats to {args.out}" + (f"; {said}" if said else ""))
        for warning in card.get("warnings", []):  # last, where a user looks
            print(f"tfkd: WARNING: {warning}", flush=True)
        return 0

    return cli.run(body, interrupted="interrupted; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
