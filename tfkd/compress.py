"""``python -m tfkd.compress``: quantization-aware training and magnitude pruning of a student.

TensorFlow Model Optimization works on tf_keras (Keras 2) models only, and importing it switches
its process to Keras 2 (``TF_USE_LEGACY_KERAS=1``), so this module runs in its own process and
is the only one that imports it. It rebuilds the Keras 3 student as a tf_keras functional model
from the same zoo code (``tfkd.models.get(..., api=tf_keras)``; a ``keras:NAME`` student from
tf_keras's copy of keras.applications), copies the weights layer by layer and checks the two
agree, wraps the layers TensorFlow Model Optimization supports, fine-tunes with the KD loss against the teacher's logits,
strips the training wrappers and writes ``model_int8.tflite`` through the same conversion and
verification as ``tfkd.export``, next to a post-training int8 export of the original student
for comparison.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tfkd.errors import ModelError

#: Largest logit difference allowed between the Keras 3 student and its tf_keras rebuild,
#: relative to the largest |logit| when that exceeds 1 (float32 round-off grows with the logits).
PARITY_TOLERANCE = 1e-5
#: Default accuracy budget: points of validation top-1 the compressed int8 model may lose
#: against the float student (``tfkd.export --max-drop``'s unit and default). A model that
#: misses it is written and flagged; one near chance means the fine-tune diverged.
MAX_DROP = 1.0


def rebuild_as_tf_keras(student: Any, image_shape: Sequence[int], num_classes: int,
                        normalization: tuple[Sequence[float], Sequence[float]] | None = None) -> Any:
    """The same architecture built with tf_keras, weights copied layer by layer: a zoo model
    from the same zoo code, a ``keras:NAME`` network from tf_keras's copy of keras.applications
    (as one flat graph, fed with the run's ``normalization``)."""
    from tfkd import models
    from tfkd.models import applications

    network = "keras:" + student.name[len("keras_"):] if student.name.startswith("keras_") else ""
    zoo = student.name in models.REGISTRY
    if not zoo and not applications.is_application(network):
        raise ModelError(f"student {student.name!r}: compress rebuilds zoo models and keras:NAME networks "
                         "(tf_keras has no KerasHub; tfkd.export's int8 formats quantize after training)")
    import tf_keras

    legacy = models.get(student.name if zoo else network, num_classes, image_shape, api=tf_keras,
                        normalization=normalization)  # (zoo models take normalized images as they are)
    copy_weights(student, legacy)
    return legacy


def weighted_layers(model: Any) -> list[Any]:
    """The layers holding weights, nested models opened, in graph order."""
    found = []
    for layer in model.layers:
        if hasattr(layer, "layers") and hasattr(layer, "inputs"):
            found.extend(weighted_layers(layer))
        elif layer.weights:
            found.append(layer)
    return found


def copy_weights(student: Any, legacy: Any) -> None:
    """Copies the Keras 3 model's weights (and batch-norm momenta) into its tf_keras twin,
    layer by layer in graph order (not by name: tf_keras numbers the unnamed layers of
    keras.applications networks per process);
    raises ``ModelError`` at the first layer whose kind or weight shapes differ."""
    source, target = weighted_layers(student), weighted_layers(legacy)
    if len(source) != len(target):
        raise ModelError(f"tf_keras rebuild of {student.name} has {len(target)} layers with weights, "
                         f"the Keras 3 model {len(source)}")
    for a, b in zip(source, target):
        values = [w.numpy() for w in a.weights]
        shapes = [tuple(w.shape) for w in b.weights]
        if type(a).__name__ != type(b).__name__ or [v.shape for v in values] != shapes:
            raise ModelError(f"tf_keras rebuild of {student.name}: layer {b.name} ({type(b).__name__}, "
                             f"{shapes}) does not match {a.name} ({type(a).__name__}, {[v.shape for v in values]})")
        b.set_weights(values)
        if hasattr(a, "momentum") and hasattr(b, "momentum"):
            b.momentum = a.momentum


def parity(student: Any, legacy: Any, images: np.ndarray) -> tuple[float, float]:
    """Max abs logit difference between the Keras 3 student and its tf_keras rebuild, and the
    difference allowed for these logits (``PARITY_TOLERANCE`` times max(1, largest |logit|))."""
    a = student(images, training=False)["logits"].numpy()
    b = legacy(images, training=False)["logits"].numpy()
    return float(np.abs(a - b).max()), PARITY_TOLERANCE * max(1.0, float(np.abs(a).max()))


def quantize_supported(model: Any) -> tuple[Any, list[str]]:
    """``model`` with quantization-aware training on every layer TensorFlow Model Optimization's
    default 8-bit scheme supports (batch norms fold into their convolutions), and the kinds of
    layer left to the int8 converter's calibration (keras.applications' Rescaling, the
    hard-swish Multiply): ``quantize_model`` refuses a model holding any of them."""
    import tensorflow_model_optimization as tfmot
    import tf_keras
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import \
        default_8bit_quantize_registry

    registry = default_8bit_quantize_registry.Default8BitQuantizeRegistry()
    left: set[str] = set()

    def annotate(layer: Any) -> Any:
        if registry.supports(layer) or isinstance(layer, tf_keras.layers.BatchNormalization):
            return tfmot.quantization.keras.quantize_annotate_layer(layer)
        if type(layer).__name__ != "InputLayer":
            left.add(type(layer).__name__)
        return layer

    annotated = tf_keras.models.clone_model(model, clone_function=annotate)  # the same layer objects
    return tfmot.quantization.keras.quantize_apply(annotated), sorted(left)


def prune_supported(model: Any, schedule: Any) -> tuple[Any, list[str]]:
    """``model`` with magnitude pruning on every layer with prunable weights (convolutions,
    dense), and the kinds of layer with weights left dense (batch norms, normalization)."""
    import tensorflow_model_optimization as tfmot
    import tf_keras
    from tensorflow_model_optimization.python.core.sparsity.keras import prune_registry

    left: set[str] = set()

    def wrap(layer: Any) -> Any:
        if layer.weights and prune_registry.PruneRegistry._LAYERS_WEIGHTS_MAP.get(type(layer)):
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        if layer.weights:
            left.add(type(layer).__name__)
        return layer

    return tf_keras.models.clone_model(model, clone_function=wrap), sorted(left)  # the same layer objects


def kd_targets(data: Any, teacher: Any, batch_size: int, seed: int) -> Any:
    """Training batches whose target packs the label and the teacher's logits: (N, 1 + C)."""
    import tensorflow as tf

    def add_teacher(x: Any, y: Any) -> Any:
        logits = teacher(x, training=False)["logits"] if teacher is not None else \
            tf.zeros((tf.shape(x)[0], data.num_classes))
        return x, tf.concat([tf.cast(y, tf.float32)[:, None], logits], axis=1)

    return data.train_dataset(batch_size, seed).map(add_teacher)


def kd_loss(alpha: float, temperature: float) -> Any:
    """``(1 - a) CE + a KD`` on packed targets (label, teacher logits); ``a = 0`` is plain CE."""
    import tensorflow as tf

    from tfkd import losses

    def loss(target: Any, logits: Any) -> Any:
        labels = tf.cast(target[:, 0], tf.int32)
        ce = losses.cross_entropy(labels, logits)
        if alpha == 0:
            return ce
        return (1 - alpha) * ce + alpha * losses.kd(target[:, 1:], logits, temperature)

    return loss


def save_deployable(model: Any, mean: Sequence[float], std: Sequence[float], path: Path) -> None:
    """SavedModel of the tf_keras logits model with the export contract: ``images`` in [0, 255]
    in, normalization inside, ``logits`` and ``probabilities`` out."""
    import tensorflow as tf

    mean_t, std_t = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)
    spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="images")

    @tf.function(input_signature=[spec])
    def serve(images: Any) -> dict[str, Any]:
        logits = model((images - mean_t) / std_t, training=False)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    module = tf.Module()
    # Only the variables the signature reads: tracking the whole tf_keras model (its layers,
    # wrappers, optimizer) made saving and converting a QAT MobileNetV3-Small about 5x slower.
    # (tf_keras.export.ExportArchive does the same as fast, but prints the scratch path.)
    module.serving_variables = list(model.variables)
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})


def compress(model_path: str | Path, out: str | Path, method: str = "qat",
             teacher_path: str | Path | None = None, epochs: int = 3, learning_rate: float = 0.01,
             sparsity: float = 0.5, kd_alpha: float = 0.9, temperature: float = 4.0,
             batch_size: int = 128, representative: int = 500, max_test_images: int = 0,
             seed: int = 0, max_drop: float = MAX_DROP) -> dict[str, Any]:
    """Fine-tunes the student with QAT or pruning and writes a verified int8 TFLite to ``out``.

    ``max_drop``: the accuracy budget, points of validation top-1 the compressed int8 model may
    lose against the float student; one that loses more is written, flagged in the report
    (``within_budget``, ``warnings``). Writes nothing and raises ``TrainingError`` when the
    fine-tune's loss stops being finite, and ``ExportError`` when the compressed model's top-1
    is near chance while the float student's is not (a diverged fine-tune)."""
    import tensorflow_model_optimization as tfmot  # switches this process to Keras 2
    import tf_keras

    from tfkd import export, health, quantize, rundir
    from tfkd.errors import ConfigError, ExportError, TrainingError
    from tfkd.pipeline import load_teacher

    if method not in ("qat", "prune"):
        raise ConfigError(f"--method {method!r}: expected qat or prune")
    out = export.check_out(out, model_path)
    student, run_dir = export.load_student(model_path)
    data = export.training_data(run_dir, None)
    try:
        info = rundir.read_dataset_record(run_dir) or {}
        info["mean"], info["std"], info["class_names"]
    except (ConfigError, KeyError) as error:
        raise ModelError(f"{run_dir / 'dataset.json'}: damaged ({error})") from None
    teacher = load_teacher(teacher_path, data) if teacher_path else None
    legacy = rebuild_as_tf_keras(student, data.image_shape, data.num_classes, (info["mean"], info["std"]))
    gap, allowed = parity(student, legacy, data.normalize(data.pixels("test", 64)[0]).numpy())
    if not gap <= allowed:
        raise ModelError(f"tf_keras rebuild of {student.name} differs from the Keras 3 model by "
                         f"{gap:.2e} (allowed {allowed:.2e})")
    logits_model = tf_keras.Model(legacy.input, legacy.output["logits"], name=student.name)
    steps = data.steps_per_epoch(batch_size) * epochs
    if method == "qat":
        model, float_layers = quantize_supported(logits_model)
        callbacks: list[Any] = []
    else:
        end_step = max(1, int(steps * 0.7))  # then fine-tune at the final sparsity
        schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, sparsity, begin_step=0, end_step=end_step,
                                                        frequency=max(1, end_step // 20))
        model, float_layers = prune_supported(logits_model, schedule)
        callbacks = [tfmot.sparsity.keras.UpdatePruningStep()]
    lr = tf_keras.optimizers.schedules.CosineDecay(learning_rate, max(steps, 1))
    model.compile(optimizer=tf_keras.optimizers.SGD(lr, momentum=0.9, nesterov=True),
                  loss=kd_loss(kd_alpha if teacher is not None else 0.0, temperature))
    start = time.perf_counter()
    history = model.fit(kd_targets(data, teacher, batch_size, seed), epochs=epochs,
                        callbacks=[*callbacks, tf_keras.callbacks.TerminateOnNaN()], verbose=2).history
    seconds = time.perf_counter() - start
    losses = history.get("loss", [])
    if not losses or not all(np.isfinite(losses)):
        raise TrainingError(f"{method} fine-tune: the loss became {losses[-1] if losses else 'nan'} "
                            f"in epoch {len(losses)}; lower --learning-rate (nothing was written)")
    if method == "prune":
        model = tfmot.sparsity.keras.strip_pruning(model)
    reference = export.deployable(student, info["mean"], info["std"])
    calibration = data.sample("train", representative, seed=0)
    out.parent.mkdir(parents=True, exist_ok=True)  # the finished folder is moved into place there
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        saved = Path(scratch) / "saved_model"
        save_deployable(model, info["mean"], info["std"], saved)
        tflite = quantize.legacy_tflite(saved, "int8", calibration)
        staging = Path(scratch) / "out"
        staging.mkdir()
        (staging / export.FILES["int8"]).write_bytes(tflite)
        reports, keras = export.verify(staging, ["int8"], lambda x: reference(x, training=False)["logits"].numpy(),
                                       data.pixel_batches("test", 256, max_test_images), 1.0, 20)
        report, float_top1 = reports["int8"], keras["top1"]
        chance = health.chance_rate(data.test_labels[:keras["images"]])
        if health.near_chance(report["top1"], chance) and not health.near_chance(float_top1, chance):
            raise ExportError(f"the {method} int8 model reaches {report['top1']:.2%} top-1 against "
                              f"{float_top1:.2%} for the float student, near chance ({chance:.2%}): "
                              "the fine-tune diverged; nothing was written")
        validation = {}
        if data.count("val"):
            validation = {"float": export.val_top1(lambda x: reference(x, training=False)["logits"].numpy(), data, 0),
                          "compressed": export.val_top1(export.runner("int8", staging / export.FILES["int8"]), data, 0)}
        ptq_dir = Path(scratch) / "ptq"
        ptq = export.export(model_path, ptq_dir, ["fp32", "int8"], max_test_images=max_test_images,
                            representative=representative, latency_runs=20, data=data, max_drop=None)
        if validation:
            validation["post_training"] = export.val_top1(export.runner("int8", ptq_dir / export.FILES["int8"]), data, 0)
        drop = None if not validation else (validation["float"] - validation["compressed"]) * 100
        warnings = [] if drop is None or drop <= max_drop else [
            f"the {method} int8 model loses {drop:.2f} pt of validation top-1 against the float "
            f"student, over the {max_drop:g}-pt budget"]
        result = {
            "method": method, "epochs": epochs, "teacher": str(teacher_path) if teacher_path else None,
            "kd_alpha": kd_alpha if teacher is not None else 0.0, "parity_max_abs_logit_diff": gap,
            "parity_allowed": allowed, "not_wrapped_layer_kinds": float_layers,
            "fine_tune_seconds": seconds, "test_images": int(keras["images"]),
            "fine_tune_loss": [float(v) for v in losses], "max_drop_pt": max_drop,
            "float_keras_top1": float_top1, "val_top1": validation, "val_drop_pt": drop,
            "within_budget": None if drop is None else drop <= max_drop, "warnings": warnings,
            "compressed_int8": report,
            "post_training_int8": ptq["formats"]["int8"], "fp32_tflite": ptq["formats"]["fp32"],
        }
        if method == "prune":
            kernels = [w.ravel() for w in model.get_weights() if w.ndim > 1]
            result["sparsity"] = float(np.mean(np.concatenate(kernels) == 0))
        for key, path in (("compressed_int8", staging / export.FILES["int8"]),
                          ("post_training_int8", ptq_dir / export.FILES["int8"])):
            result[key]["gzip_bytes"] = len(gzip.compress(path.read_bytes()))
        (staging / "labels.txt").write_text("\n".join(info["class_names"]) + "\n")
        result[export.MARKER] = {"version": 1, "files": [export.FILES["int8"], "labels.txt",
                                                          "compress_report.json"]}
        result = export.finite(result)
        (staging / "compress_report.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
        said = export.describe_replacement(export.publish(staging, out))
        if said:
            print(f"tfkd: note: {out}: {said}", flush=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m tfkd.compress``."""
    from tfkd import cli

    parser = cli.Parser(
        prog="python -m tfkd.compress",
        description="Quantization-aware training (qat) or magnitude pruning (prune) of a distilled "
                    "student with TensorFlow Model Optimization, fine-tuned with KD against the "
                    "teacher; writes a verified model_int8.tflite and compress_report.json "
                    "comparing it with post-training int8. Needs the 'compress' extra.",
        epilog="Exit codes: 0 done, 2 bad option (or --out holds other files), 3 bad data, 4 bad "
               "model file, 5 the fine-tune's loss stopped being finite, 6 the compressed model "
               "is near chance: the fine-tune diverged (nothing written in either case), 130 "
               "interrupted. A model over the --max-drop budget is written and flagged.")
    parser.add_argument("model", help="student.keras, or its run folder")
    parser.add_argument("--out", required=True,
                        help="output folder: new, empty, or a previous compress output")
    parser.add_argument("--method", choices=("qat", "prune"), default="qat")
    parser.add_argument("--teacher", help="teacher for the KD fine-tuning loss (default: CE only)")
    parser.add_argument("--epochs", type=cli.positive_int, default=3)
    parser.add_argument("--learning-rate", type=cli.positive_float, default=0.01)
    parser.add_argument("--sparsity", type=float, default=0.5, help="prune: final sparsity, in (0, 1)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=128)
    parser.add_argument("--max-test-images", type=cli.non_negative_int, default=0,
                        help="verify on the first N (0: all)")
    parser.add_argument("--max-drop", type=float, default=MAX_DROP, metavar="PT",
                        help=f"accuracy budget: points of validation top-1 the compressed int8 model "
                             f"may lose against the float student (default {MAX_DROP:g}, as "
                             "tfkd.export); one that loses more is written and flagged")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's own log")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    from tfkd import cli, export
    from tfkd.errors import ConfigError

    def body() -> int:
        args = build_parser().parse_args(argv)
        if not 0 < args.sparsity < 1:
            raise ConfigError(f"--sparsity {args.sparsity}: expected a fraction in (0, 1)")
        if not 0 <= args.max_drop <= 100:
            raise ConfigError(f"--max-drop {args.max_drop}: expected points of top-1 from 0 to 100")
        export.check_out(args.out, args.model)
        cli.import_tensorflow(args.verbose)
        from tfkd import rundir

        source = Path(args.model)
        try:  # the run folder stays as it is while it is read (no training replaces its student)
            with rundir.reading(source if source.is_dir() else source.parent,
                                "python -m tfkd.compress " + " ".join(sys.argv[1:])):
                result = compress(args.model, args.out, args.method, args.teacher, args.epochs,
                                  args.learning_rate, args.sparsity, batch_size=args.batch_size,
                                  max_test_images=args.max_test_images, max_drop=args.max_drop)
        except ImportError as error:
            raise ConfigError(f"{error.name or error}: install the extra with pip install -e "
                              "'.[compress]'") from None
        c, p, f = result["compressed_int8"], result["post_training_int8"], result["fp32_tflite"]
        print(f"{args.method}: int8 top-1 {c['top1'] * 100:.2f}% ({c['bytes'] / 1024:.1f} KiB, "
              f"{c['gzip_bytes'] / 1024:.1f} gzipped) | post-training int8 {p['top1'] * 100:.2f}% "
              f"({p['bytes'] / 1024:.1f} KiB, {p['gzip_bytes'] / 1024:.1f} gzipped) | "
              f"fp32 {f['top1'] * 100:.2f}% ({f['bytes'] / 1024:.1f} KiB)")
        for warning in result.get("warnings", []):
            print(f"tfkd: WARNING: {warning}", flush=True)
        return 0

    return cli.run(body, interrupted="interrupted; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
