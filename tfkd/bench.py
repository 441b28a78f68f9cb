"""``python -m tfkd.bench``: benchmarks that print their figures.

``accuracy``: runs an accuracy protocol (``benchmarks/protocols/*.yaml``): trains its teachers
once, then every student method, each run cached in ``OUT/runs``; writes ``results.json``,
``results.md`` and ``results.png`` (see ``tfkd.protocol``).

``pipeline``: images per second of the input pipeline alone (in memory or streamed) next to a
training step on the same data (the teacher's, or a student's distillation step), their ratio
(the pipeline must not be what limits training), and the process's peak memory while it reads
the data against the dataset's decoded size (streaming must not hold the dataset).

``speed``: training images per second of every method's step on one teacher and student, next
to a ``keras.distillation.Distiller`` KD step on the same pair and the input pipeline alone, all
in one process, as ratios to the Keras KD step; then batch-1 inference latency of the student
and the teacher in ONNX Runtime and LiteRT (fp32 and int8), as teacher/student ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence


def _pipeline_rate(dataset: Any, batches: int) -> float:
    iterator = iter(dataset.repeat())  # a small dataset wraps around
    next(iterator)  # warm-up: builds the pipeline and fills the prefetch buffer
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += int(next(iterator)[1].shape[0])
    return images / (time.perf_counter() - start)


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _step(args: argparse.Namespace, data: Any) -> Any:
    """What ``pipeline`` times the input against: the teacher's reconstruction training step, or
    with ``--student-model`` the ``--method`` distillation step of that student from a
    ``--teacher-model`` teacher, at the data's size (untrained weights: the work is the same)."""
    import keras

    from tfkd import config as config_lib
    from tfkd import models
    from tfkd.distill import methods
    from tfkd.pipeline import build_distiller
    from tfkd.teacher import ReconstructionTeacher

    def sgd() -> Any:
        return keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True)

    normalization = (data.mean, data.std)
    if args.student_model is None:
        teacher = ReconstructionTeacher(models.get(args.teacher_model, data.num_classes, data.image_shape,
                                                   normalization=normalization),
                                        pixel_mean=data.mean.tolist(), pixel_std=data.std.tolist())
        teacher.compile(optimizer=sgd())
        return teacher
    cfg = config_lib.load(dotlist=[f"distill.method={args.method}"])
    teachers = [models.get(args.teacher_model, data.num_classes, data.image_shape, normalization=normalization)
                for _ in methods.resolve(args.method).teachers]
    student = models.get(args.student_model, data.num_classes, data.image_shape, normalization=normalization)
    distiller = build_distiller(cfg, student, teachers, steps_per_epoch=50,
                                train_labels=lambda: data.train_labels)
    distiller.compile(optimizer=sgd())
    distiller.build_all()
    return distiller


def pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """Measures the input pipeline (in memory or streamed) against a training step, and the
    process's peak memory while it streams against the dataset's decoded size."""
    from tfkd import data as data_lib

    baseline = _peak_rss_mb()
    data = data_lib.prepare(args.dataset, args.data_dir, image_size=args.image_size,
                            validation_fraction=0.1, pipeline=args.pipeline)
    images = sum(data.count(s) for s in ("train", "val", "test"))
    side = data.image_shape[0]  # decoded at the models' input size
    pipe = _pipeline_rate(data.train_dataset(args.batch_size), args.batches)
    peak = _peak_rss_mb()  # before any model exists: what reading the data costs
    model = _step(args, data)
    batch = next(iter(data.train_dataset(args.batch_size)))  # _fit_rates adds what the step reads
    step = _fit_rates({"step": model}, batch, args.steps)["step"]
    pipe, step = round(pipe, 1), round(step, 1)
    decoded = images * side * side * 3 / 2**20
    result = {"dataset": args.dataset, "pipeline": data.pipeline, "images": images,
              "image_size": data.image_shape[0], "batch_size": args.batch_size,
              "step": (f"{args.method}: {args.teacher_model} -> {args.student_model}"
                       if args.student_model else f"reconstruction teacher {args.teacher_model}"),
              "pipeline_images_per_second": pipe, "train_step_images_per_second": step,
              "pipeline_over_step": round(pipe / step, 2),
              "decoded_dataset_mb": round(decoded, 1),
              "peak_rss_mb_before_data": round(baseline, 1), "peak_rss_mb_while_reading": round(peak, 1),
              "peak_rss_over_decoded": round(peak / decoded, 3) if decoded else None,
              "cpu_count": os.cpu_count()}
    print(json.dumps(result, indent=2))
    if args.out:
        import shlex
        from pathlib import Path

        from tfkd import io
        from tfkd.protocol import provenance

        io.write_json(Path(args.out) / "pipeline.json",
                      {**result, **provenance("python -m tfkd.bench " + shlex.join(args.argv))})
    return result


def _fit_rates(models: dict[str, Any], batch: tuple[Any, Any], steps: int,
               repeats: int = 3) -> dict[str, float]:
    """Images/s of each model's ``fit`` on one in-memory batch repeated (the step alone).

    Each timing runs from the first to the last batch end inside ``fit``, so set-up and
    tear-down are left out (on this machine ``fit`` sometimes spends ~2 s after
    ``on_train_end``). The models take turns, one timing each per round, so a slow spell of a
    shared machine falls on every model rather than on whichever was being timed; each keeps the
    best of its ``repeats`` timings, the one least disturbed by other work. A model that trains
    with the examples' indices (``needs_index``: a memory bank) gets ``{"images", "index"}``, one
    that reads a strong view (``needs_strong_view``) ``"strong"`` too (``_step_inputs``).
    """
    import keras
    import tensorflow as tf

    data = {name: tf.data.Dataset.from_tensors((_step_inputs(m, batch), batch[1])).repeat()
            for name, m in models.items()}
    for name, model in models.items():
        model.fit(data[name], steps_per_epoch=3, epochs=1, verbose=0, shuffle=False)  # trace, warm up
    best = {name: float("inf") for name in models}
    for _ in range(max(repeats, 1)):
        for name, model in models.items():
            ends: list[float] = []
            clock = keras.callbacks.LambdaCallback(
                on_train_batch_end=lambda *_, **__: ends.append(time.perf_counter()))
            model.fit(data[name], steps_per_epoch=steps + 1, epochs=1, verbose=0, shuffle=False,
                      callbacks=[clock])
            best[name] = min(best[name], ends[-1] - ends[0])  # ``steps`` steps between the ends
    size = int(batch[1].shape[0])
    return {name: steps * size / seconds for name, seconds in best.items()}


def _step_inputs(model: Any, batch: tuple[Any, Any]) -> Any:
    """The inputs of ``model``'s train step on ``batch``: the images, or ``{"images", "index",
    "strong"}`` as it needs (the strong view: the same pixels, which cost what any others do)."""
    import numpy as np

    index, strong = getattr(model, "needs_index", False), getattr(model, "needs_strong_view", False)
    if not (index or strong):
        return batch[0]
    x = {"images": batch[0]}
    if index:
        x["index"] = np.arange(int(batch[1].shape[0]), dtype=np.int32)
    if strong:
        x["strong"] = batch[0]
    return x


def _step_multiply_adds(model: Any, batch: tuple[Any, Any]) -> float:
    """Multiply-adds per image of one ``train_step`` of ``model``, as TensorFlow's graph profiler
    counts them (convolutions, their gradients, matrix products: the work the step must do)."""
    import tensorflow as tf

    x = _step_inputs(model, batch)
    graph = tf.function(lambda: model.train_step((x, batch[1]))).get_concrete_function().graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return tf.compat.v1.profiler.profile(graph, options=options).total_float_ops / 2 / int(batch[1].shape[0])


def speed(args: argparse.Namespace) -> dict[str, Any]:
    """Times each method's train step against keras.distillation's KD step."""
    import keras
    import numpy as np

    from tfkd import config as config_lib
    from tfkd import models
    from tfkd.distill import methods
    from tfkd.pipeline import build_distiller

    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(args.batch_size, 32, 32, 3)).astype(np.float32),
             rng.integers(0, 10, args.batch_size).astype(np.int32))
    train_labels = rng.integers(0, 10, 50 * args.batch_size).astype(np.int32)  # a memory bank's size
    keras.utils.set_random_seed(0)
    teacher_models = [models.get(args.teacher_model, 10) for _ in range(2)]

    def sgd() -> Any:
        return keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def logits_only(model: Any) -> Any:
        return keras.Model(model.input, model.output["logits"])

    student_model = models.get(args.student_model, 10)
    reference = keras.distillation.Distiller(
        teacher=logits_only(teacher_models[0]), student=logits_only(student_model),
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=4.0, loss=keras.losses.KLDivergence()),
        student_loss_weight=0.1)
    reference.compile(optimizer=sgd(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    steps_to_time: dict[str, Any] = {"keras_distiller_kd": reference}
    for method in args.methods:  # the training defaults of each method: the step users run
        cfg = config_lib.load(dotlist=[f"distill.method={method}"])
        needed = len(methods.resolve(method).teachers)
        distiller = build_distiller(cfg, models.get(args.student_model, 10), teacher_models[:needed],
                                    steps_per_epoch=50, train_labels=train_labels)
        distiller.compile(optimizer=sgd())
        distiller.build_all()
        steps_to_time[method] = distiller
    rates = _fit_rates(steps_to_time, batch, args.steps, args.repeats)
    work = {name: _step_multiply_adds(model, batch) for name, model in steps_to_time.items()}
    if args.pipeline_batches:
        from tfkd import data as data_lib

        dataset = args.dataset or ("cifar10" if args.data_dir else "digits")
        data = data_lib.prepare(dataset, args.data_dir if dataset.startswith("cifar") else None,
                                validation_fraction=0.1)
        rates["input_pipeline"] = _pipeline_rate(data.train_dataset(args.batch_size),
                                                 args.pipeline_batches)
    # Ratios are taken of the rates as printed, so a reader dividing two printed rates gets the
    # printed ratio (a fast input pipeline against a slow step magnifies any rounding gap).
    rates = {k: round(v, 1) for k, v in rates.items()}
    base = rates["keras_distiller_kd"]
    result: dict[str, Any] = {
        "teacher": args.teacher_model, "student": args.student_model,
        "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "training_images_per_second": rates,
        "training_ratio_to_keras_distiller_kd": {k: round(v / base, 3) for k, v in rates.items()},
        "training_step_multiply_adds_per_image": {k: round(v / 1e6, 2) for k, v in work.items()},
        # the graph profiler counts the Keras Distiller's teacher twice (it calls the teacher in
        # its loss and its metrics; grappler runs it once), so the work is compared with our kd's
        "training_work_ratio_to_kd": {k: round(v / work["kd"], 3) for k, v in work.items()
                                      if k != "keras_distiller_kd"} if "kd" in work else {}}
    if "student" in rates:
        result["training_ratio_to_student_alone"] = {k: round(v / rates["student"], 3)
                                                     for k, v in rates.items()}
    if args.latency_runs:
        latency = {name: _latencies(model, args.latency_runs)
                   for name, model in (("student", student_model), ("teacher", teacher_models[0]))}
        result["inference_batch1_ms"] = latency
        result["inference_teacher_over_student"] = {
            fmt: round(latency["teacher"][fmt] / latency["student"][fmt], 2) for fmt in latency["student"]}
    print(json.dumps(result, indent=2))
    if args.out:
        _write_speed_report(result, args)
    return result


#: What each timed training step is, for the speed table.
STEP_NAMES = {"keras_distiller_kd": "`keras.distillation.Distiller` KD", "student": "student alone",
              "input_pipeline": "input pipeline alone"}


def speed_markdown(result: dict[str, Any]) -> str:
    """The speed figures as Markdown: a training table with both ratios, then latencies."""
    rates = result["training_images_per_second"]
    to_keras = result["training_ratio_to_keras_distiller_kd"]
    to_student = result.get("training_ratio_to_student_alone", {})
    machine = result["machine"]
    lines = [f"# Speed: {result['teacher']} -> {result['student']}, batch {result['batch_size']}", "",
             f"Training steps: best of {result['repeats']} timings of {result['steps']} steps each, "
             "the steps taking turns, on one in-memory batch (the step alone); the input pipeline "
             "on the real data. Multiply-adds: one step's convolutions, their gradients and matrix "
             "products per image, as TensorFlow's graph profiler counts them.", "",
             "| step | images/s | vs Keras KD | vs student alone | multiply-adds per image (M) | "
             "work vs `kd` |", "| --- | --- | --- | --- | --- | --- |"]
    work = result.get("training_step_multiply_adds_per_image", {})
    work_ratio = result.get("training_work_ratio_to_kd", {})
    for name, rate in rates.items():
        label = STEP_NAMES.get(name, f"`{name}`")
        ratio = to_student.get(name)
        lines.append(f"| {label} | {rate:,.1f} | {to_keras[name]:.3f} | "
                     f"{'—' if ratio is None else f'{ratio:.3f}'} | "
                     f"{work[name] if name in work and name != 'keras_distiller_kd' else '—'} | "
                     f"{work_ratio[name] if name in work_ratio else '—'} |")
    latency = result.get("inference_batch1_ms")
    if latency:
        lines += ["", "Batch-1 inference latency (median ms):", "",
                  "| runtime | student | teacher | teacher / student |", "| --- | --- | --- | --- |"]
        for fmt, ms in latency["student"].items():
            lines.append(f"| {fmt} | {ms:.3f} | {latency['teacher'][fmt]:.3f} | "
                         f"{result['inference_teacher_over_student'][fmt]:.2f}x |")
    lines += ["", f"Command: `{result['command']}`  ", f"Commit: `{result['git_commit']}`, date "
              f"{result['date']}  ", f"Machine: {machine['cpu_count']} cores, {machine['cpu_model']}, "
              f"Python {machine['python']}", ""]
    return "\n".join(lines)


def _write_speed_report(result: dict[str, Any], args: argparse.Namespace) -> None:
    import shlex
    from pathlib import Path

    from tfkd import io
    from tfkd.protocol import provenance

    result.update(provenance("python -m tfkd.bench " + shlex.join(args.argv)))
    out = Path(args.out)
    io.write_json(out / "speed.json", result)
    io.write_text(out / "speed.md", speed_markdown(result))
    print(f"tfkd.bench: wrote {out / 'speed.json'}, speed.md")


def _latencies(backbone: Any, runs: int) -> dict[str, float]:
    """Batch-1 latency (median ms) of ``backbone`` exported as the deployed contract."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from tfkd import export, formats, quantize

    model = export.deployable(backbone, [127.5] * 3, [64.0] * 3)
    image = np.random.default_rng(0).uniform(0, 255, (32, 32, 3)).astype(np.float32)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "saved_model"
        export.export_saved_model(model, saved)
        for mode in ("fp32", "int8"):
            path = Path(tmp) / f"model_{mode}.tflite"
            path.write_bytes(quantize.legacy_tflite(saved, mode, image[None].repeat(20, 0)))
            result[f"tflite_{mode}"] = round(export.batch1_latency_ms(
                export.tflite_runner(path), image, runs), 3)
        formats.convert_onnx(saved, Path(tmp) / "model.onnx")
        result["onnx"] = round(export.batch1_latency_ms(
            export.runner("onnx", Path(tmp) / "model.onnx"), image, runs), 3)
    return result


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """Runs (or continues) an accuracy protocol and writes its report."""
    import shlex
    from pathlib import Path

    from tfkd import protocol as protocol_lib

    protocol = protocol_lib.load(args.protocol)
    if args.smoke:  # one epoch of every teacher the protocol's smoke runs need, and of those runs
        args.epochs, args.only = args.epochs or 1, args.only or protocol.smoke
        args.seeds = args.seeds or protocol.seeds[:1]
    out = Path(args.out or (Path("runs") / "smoke" if args.smoke else Path("benchmarks") / "results") / protocol.name)
    teachers_dir = args.teachers_dir or os.environ.get("TFKD_TEACHERS_DIR") or (
        str(Path(args.data_dir).parent / "teachers") if args.data_dir else None)
    job_list = protocol_lib.jobs(protocol, out, args.data_dir, args.epochs, args.seeds, args.only,
                                 args.set, args.validation_only, teachers_dir)
    # the report covers every run of the protocol, finished ones from the cache, even when --only
    # runs a subset; --report-only --only RUN ... reports just those runs (and their teachers);
    # a smoke report, the smoke runs
    scoped = bool(args.report_only and args.only) or args.smoke
    report_jobs = job_list if scoped else protocol_lib.jobs(
        protocol, out, args.data_dir, args.epochs, args.seeds, None, args.set, args.validation_only,
        teachers_dir)
    # the command that trains every reported run: without --report-only (and --only RUN ... unless
    # the report is scoped to them)
    kept, skipping = [], False
    for arg in args.argv:
        skipping = not scoped and (arg == "--only" or (skipping and not arg.startswith("--")))
        if not skipping and arg != "--report-only":
            kept.append(arg)
    command = "python -m tfkd.bench " + shlex.join(protocol_lib.portable(kept))
    if args.report_only:
        results = protocol_lib.report(protocol, out, report_jobs, command)
    else:
        results = protocol_lib.run_protocol(protocol, out, job_list, command, report_jobs=report_jobs,
                                            parallel=1 if args.smoke else args.jobs,
                                            launch=protocol_lib.launch_here if args.smoke else None)
    print(protocol_lib.markdown(results))
    print(f"tfkd.bench: wrote {out / 'results.json'}, results.md, results.png")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    from tfkd import cli
    from tfkd.protocol import shipped as protocol_names

    parser = cli.Parser(prog="python -m tfkd.bench", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="Exit codes: 0 done, 2 bad option or protocol, 3 bad data, 5 a run "
                               "failed, 130 interrupted (re-run the same command to continue).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("accuracy", help="run an accuracy protocol; cached, resumable")
    p.add_argument("--protocol", default="cifar10-cpu",
                   help=f"a shipped protocol ({', '.join(protocol_names())}) or a YAML file")
    p.add_argument("--data-dir", default=os.environ.get("TFKD_CIFAR10_DIR"),
                   help="CIFAR python batches folder (default: $TFKD_CIFAR10_DIR; unset: "
                        "TensorFlow Datasets)")
    p.add_argument("--teachers-dir", help="folder of the PyTorch checkpoints a protocol imports "
                                          "(default: $TFKD_TEACHERS_DIR, else 'teachers' beside --data-dir)")
    p.add_argument("--out", help="output folder (default: benchmarks/results/PROTOCOL)")
    p.add_argument("--epochs", type=cli.positive_int, help="epochs of every teacher and student run")
    p.add_argument("--seeds", type=cli.seed_int, nargs="+", help="student seeds (mean ± std over them)")
    p.add_argument("--only", nargs="+", metavar="RUN",
                   help="run only these runs of the protocol (the report still shows every "
                        "finished run; with --report-only: only these)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run (tuning), e.g. distill.beta=0.01")
    p.add_argument("--validation-only", action="store_true",
                   help="tuning: never evaluate on the test split")
    p.add_argument("--smoke", action="store_true",
                   help="check the protocol end to end, fast: one epoch of the runs its 'smoke' key "
                        "lists (default: the student alone) and of their teachers, one seed, into "
                        "runs/smoke/PROTOCOL (default --out)")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the finished runs, train nothing")
    p.add_argument("--jobs", type=cli.positive_int, default=1, metavar="N",
                   help="runs side by side (a student starts once its teachers are done); each "
                        "gets cores/N TensorFlow threads and writes its output to OUT/logs/")
    p = sub.add_parser("deploy", help="train phone students, export every way, QAT, time and count ops "
                                      "(tfkd.deploy_bench); cached, resumable")
    p.add_argument("--protocol", default="cifar10-deploy",
                   help=f"a shipped protocol ({', '.join(protocol_names())}) or a YAML file")
    p.add_argument("--data-dir", default=os.environ.get("TFKD_CIFAR10_DIR"),
                   help="CIFAR python batches folder (default: $TFKD_CIFAR10_DIR)")
    p.add_argument("--teachers-dir", help="folder of the PyTorch checkpoints a protocol imports")
    p.add_argument("--out", help="output folder (default: benchmarks/results/deploy)")
    p.add_argument("--epochs", type=cli.positive_int, help="epochs of every teacher and student run")
    p.add_argument("--only", nargs="+", metavar="RUN",
                   help="train, export and report only these runs of the protocol (and their teachers)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run")
    p.add_argument("--max-drop", type=float, default=1.0, metavar="PT",
                   help="the exports' and QAT's accuracy budget (points of validation top-1, default 1.0)")
    p.add_argument("--qat-epochs", type=cli.non_negative_int, default=2,
                   help="QAT epochs of each distilled student (0: no QAT; default 2)")
    p.add_argument("--latency-runs", type=cli.positive_int, default=50,
                   help="the exports' own timed calls per format (default 50)")
    p.add_argument("--timing-runs", type=cli.positive_int, default=300,
                   help="batch-1 calls the kit times per file (default 300)")
    p.add_argument("--formats", help="the exports' formats, comma-separated (default: all)")
    p.add_argument("--max-test-images", type=cli.non_negative_int, default=0,
                   help="the exports and QAT verify on the first N test images (default: all)")
    p = sub.add_parser("pipeline", help="input pipeline vs a training step, images/s; peak memory")
    p.add_argument("--dataset", default="digits", help="dataset (as for tfkd.train: cifar10, digits, "
                                                      "folder:PATH, tfds:NAME)")
    p.add_argument("--data-dir", default=os.environ.get("TFKD_CIFAR10_DIR"),
                   help="CIFAR python batches folder (default: $TFKD_CIFAR10_DIR), or tfds:NAME's folder")
    p.add_argument("--image-size", type=cli.positive_int, default=32, help="the models' input side (data.image_size)")
    p.add_argument("--pipeline", choices=("auto", "memory", "streaming"), default="auto",
                   help="data.pipeline (default auto)")
    p.add_argument("--teacher-model", "--model", dest="teacher_model", default="resnet20",
                   help="teacher backbone (default resnet20)")
    p.add_argument("--student-model", help="time this student's distillation step (default: the "
                                           "teacher's own reconstruction training step)")
    p.add_argument("--method", default="cft", help="the distillation method of --student-model (default cft)")
    p.add_argument("--batch-size", type=cli.positive_int, default=128)
    p.add_argument("--batches", type=cli.positive_int, default=200, help="pipeline batches to time")
    p.add_argument("--steps", type=cli.positive_int, default=20, help="train steps to time")
    p.add_argument("--out", help="also write pipeline.json (with the command, commit, date and machine)")
    p = sub.add_parser("speed", help="training images/s of every method vs keras.distillation KD")
    p.add_argument("--teacher-model", default="resnet20")
    p.add_argument("--student-model", default="resnet8")
    p.add_argument("--batch-size", type=cli.positive_int, default=128)
    p.add_argument("--steps", type=cli.positive_int, default=30, help="timed steps per method and repeat")
    p.add_argument("--repeats", type=cli.positive_int, default=5,
                   help="timings per method, the methods taking turns; the fastest is reported "
                        "(default 5)")
    from tfkd.distill.methods import REGISTRY

    p.add_argument("--methods", nargs="+", default=[
        *(n for n, m in REGISTRY.items() if m.modify is None), *(f"kd+{n}" for n, m in REGISTRY.items() if m.modify)],
        help="methods to time (default: every registered method, and each modifier on kd)")
    p.add_argument("--dataset", help="dataset of the input-pipeline measurement (default: "
                                      "cifar10 with a data folder, else digits)")
    p.add_argument("--data-dir", default=os.environ.get("TFKD_CIFAR10_DIR"),
                   help="CIFAR python batches folder (default: $TFKD_CIFAR10_DIR)")
    p.add_argument("--pipeline-batches", type=cli.non_negative_int, default=200,
                   help="input-pipeline batches to time (0: skip)")
    p.add_argument("--latency-runs", type=cli.non_negative_int, default=200,
                   help="timed batch-1 inference calls per format (0: skip the latency part)")
    p.add_argument("--out", help="also write speed.json and speed.md (with the command, commit, "
                                 "date and machine) to this folder")
    def body() -> int:
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        if args.command == "speed":
            from tfkd.distill import methods
            from tfkd.errors import ConfigError

            for method in args.methods:
                try:
                    methods.resolve(method)
                except ConfigError:
                    raise ConfigError(f"--methods {method}: expected some of {', '.join(methods.METHODS)} "
                                      "or compositions like kd+ls") from None
        if args.command == "deploy":
            if not 0 <= args.max_drop <= 100:
                from tfkd.errors import ConfigError

                raise ConfigError(f"--max-drop {args.max_drop}: expected points of top-1 from 0 to 100")
            from tfkd import deploy_bench

            deploy_bench.run(args)  # every step is a process of its own
            return 0
        if args.command != "accuracy":  # accuracy runs each job as its own tfkd.train process
            cli.import_tensorflow()
        {"accuracy": accuracy, "pipeline": pipeline, "speed": speed}[args.command](args)
        return 0

    return cli.run(body, interrupted="interrupted; re-run the same command to continue")


if __name__ == "__main__":
    sys.exit(main())
