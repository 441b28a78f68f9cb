"""``python -m tfkd.train``: parse the configuration, build, fit, write the run directory.

Stages run in order: ``teacher`` trains the teacher(s) the method needs (one
reconstruction-augmented teacher; for ``mktn`` Teacher1, an autoencoder, and Teacher2, a plain
classifier), ``distill`` trains the student with the method's loss terms, ``export`` writes and
verifies the student's edge formats in ``export/``; ``all`` runs the three.

Run directory layout (every file written atomically):

- ``config.yaml``, ``dataset.json``: the resolved configuration; class names, split sizes and
  the normalization constants
- ``teacher.keras`` (``teacher1.keras`` + ``teacher2.keras`` for mktn): trained teachers
- ``student.keras``: the distilled student alone (no adapters, no discriminators)
- ``backup/<stage>/``: ``BackupAndRestore`` state while a stage trains (everything needed to
  resume: weights, adapters, discriminators, both optimizers' state); a killed run resumes
- ``<stage>_log.csv`` and ``tensorboard/<stage>/``: per-epoch metrics
- ``reconstructions.png``: test images over the teacher's reconstructions
- ``export/``: SavedModel, TFLite, ONNX, labels and model card (see ``tfkd.export``)
- ``metrics.json``: the last stage's headline metrics at top level, every stage's under ``stages``
- ``status.json``: what the run is doing now (stage, phase, epoch), or ``done``

A stage whose artifact already exists is skipped, so re-running a finished command is cheap
and re-running an interrupted one continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tfkd import config as config_lib
from tfkd.errors import TfkdError

#: Dedicated flags: flag -> (config key, help). Everything else goes through --set.
FLAGS = {
    "--stage": ("stage", "what to run: teacher, distill, export, or all (default)"),
    "--method": ("distill.method", "student, kd, fitnet, at, cft (default) or mktn"),
    "--teacher": ("distill.teachers", "a trained teacher (.keras file or run folder); give it "
                                      "twice for mktn: the reconstruction teacher, then the "
                                      "classifier"),
    "--student-model": ("student.model", "student backbone from the model zoo"),
    "--dataset": ("data.dataset", "cifar10, cifar100, digits (offline default) or folder:PATH"),
    "--data-dir": ("data.data_dir", "folder holding the canonical CIFAR python batches; without "
                                    "it CIFAR comes from TensorFlow Datasets"),
    "--teacher-model": ("teacher.model", "teacher backbone from the model zoo"),
    "--epochs": ("epochs", "training epochs of every stage that trains"),
    "--batch-size": ("data.batch_size", "global batch size"),
    "--run-dir": ("run_dir", "output folder; re-running the same command resumes there"),
    "--strategy": ("strategy", "tf.distribute strategy: auto, default, mirrored, multiworker"),
    "--seed": ("seed", "random seed"),
    "--deterministic": ("deterministic", "deterministic ops: two runs with the same --seed write "
                                         "identical metrics (slower)"),
}
TRAINING_SECTIONS = ("teacher", "student")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; ``--help`` lists every config key too."""
    parser = argparse.ArgumentParser(
        prog="python -m tfkd.train",
        description="Train a reconstruction-augmented teacher, then distill a student from it "
                    "with the chosen method. With no arguments: the whole pipeline (cft) on the "
                    "bundled digits dataset.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every option below can be set in the --config YAML file (nested sections) or "
               "with --set KEY=VALUE;\nthe dedicated flags above win over both.\n\n"
               + config_lib.describe_options()
               + "\n\nExit codes: 0 done, 2 bad option or config, 3 bad data, 4 bad model file,"
                 " 5 training failed, 130 interrupted.")
    parser.add_argument("--config", metavar="YAML", help="YAML file of options (see below)")
    for flag, (_, help_text) in FLAGS.items():
        kwargs: dict[str, Any] = {"help": help_text}
        if flag in ("--epochs", "--batch-size", "--seed"):
            kwargs["type"] = int
        if flag == "--stage":
            kwargs["choices"] = config_lib.STAGES
        if flag == "--strategy":
            kwargs["choices"] = config_lib.STRATEGIES
        if flag == "--teacher":
            kwargs["action"] = "append"
        if flag == "--deterministic":
            kwargs["action"] = "store_const"
            kwargs["const"] = True
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any option, e.g. --set teacher.lambda_rec=0 (repeatable)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration and exit")
    return parser


def config_from_args(args: argparse.Namespace) -> config_lib.RunConfig:
    """Merges defaults, --config, --set and the dedicated flags into a validated config."""
    overrides: dict[str, Any] = {}
    for flag, (key, _) in FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if key == "epochs":
            if value is not None:
                overrides.update({f"{section}.epochs": value for section in TRAINING_SECTIONS})
        else:
            overrides[key] = value
    return config_lib.load(args.config, overrides, args.set)


def _update_metrics(run_dir: Path, stage: str, metrics: dict[str, Any],
                    headline: dict[str, Any] | None = None) -> None:
    """Records ``metrics`` under ``stages[stage]``; the top level shows ``headline`` (default:
    these metrics)."""
    from tfkd import io

    path = run_dir / "metrics.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    stages = previous.get("stages", {})
    stages[stage] = metrics
    io.write_json(path, {"stage": stage, **(headline or metrics), "stages": stages})


def _learning_rate(opt: config_lib.OptimizerConfig, batch_size: int, steps_per_epoch: int,
                   epochs: int) -> Any:
    """The configured schedule, the base rate scaled linearly from batch 128 to ``batch_size``."""
    import keras

    lr = opt.learning_rate * batch_size / 128
    if opt.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(steps_per_epoch * epochs, 1))
    if opt.schedule == "step":
        milestones = [m for m in opt.milestones if m < epochs]
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            [m * steps_per_epoch for m in milestones],
            [lr * opt.decay_rate ** i for i in range(len(milestones) + 1)]) if milestones else lr
    return lr


def _sgd(opt: config_lib.OptimizerConfig, batch_size: int, steps_per_epoch: int, epochs: int) -> Any:
    import keras

    return keras.optimizers.SGD(_learning_rate(opt, batch_size, steps_per_epoch, epochs),
                                momentum=opt.momentum,
                                nesterov=True, weight_decay=opt.weight_decay or None)


def discriminator_optimizer(disc: config_lib.DiscriminatorConfig) -> Any:
    """The discriminators' Adam from ``distill.discriminator``; ``bench speed`` times the same one."""
    import keras

    return keras.optimizers.Adam(disc.learning_rate, beta_1=disc.beta_1)


def _fit(model: Any, cfg: config_lib.RunConfig, data: Any, out_dir: Path, stage: str, epochs: int,
         extra_callbacks: list[Any]) -> tuple[dict[str, list[float]], dict[str, Any], dict[str, Any], Any]:
    """Fits ``model`` with the run's callbacks; returns (history, val metrics, test metrics, meter)."""
    import keras

    from tfkd import callbacks

    batch = cfg.data.batch_size
    train_ds = data.train_dataset(batch, cfg.seed, cfg.data.augment, cfg.data.shuffle_buffer)
    val_ds = data.eval_dataset("val", batch) if len(data.val_labels) else None
    meter = callbacks.ThroughputMeter(batch)
    status = callbacks.RunStatus(out_dir / "status.json", stage, epochs)
    cbs = [
        # The backup outlives fit (delete_checkpoint=False) until the artifact is saved, so a run
        # killed during the final evaluation resumes there instead of training again.
        callbacks.AtomicBackupAndRestore(str(out_dir / "backup" / stage), delete_checkpoint=False),
        callbacks.NanGuard(stage, out_dir / "backup" / stage),
        status,
        keras.callbacks.CSVLogger(str(out_dir / f"{stage}_log.csv"), append=True),
        keras.callbacks.TensorBoard(str(out_dir / "tensorboard" / stage), profile_batch=0),
        meter, *extra_callbacks,
    ]
    verbose = cfg.verbose if cfg.verbose is not None else (1 if sys.stdout.isatty() else 2)
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=cbs,
                        verbose=verbose, shuffle=False).history  # the dataset shuffles itself
    _check_finite(history, stage)
    status.write("evaluate")
    test = model.evaluate(data.eval_dataset("test", batch), verbose=0, return_dict=True) \
        if cfg.data.evaluate_test else {}
    val = model.evaluate(val_ds, verbose=0, return_dict=True) if val_ds is not None else {}
    status.write("save")
    return history, val, test, meter


def train_teacher(cfg: config_lib.RunConfig, data: Any, strategy: Any, out_dir: Path,
                  name: str = "teacher", lambda_cls: float | None = None,
                  lambda_rec: float | None = None) -> dict[str, Any]:
    """Trains a reconstruction-augmented teacher saved as ``<name>.keras``; returns its metrics.

    ``lambda_cls``/``lambda_rec`` default to the config's (MKTN's teachers override them).
    """
    from tfkd import callbacks, io, models
    from tfkd.teacher import ReconstructionTeacher

    tcfg, batch = cfg.teacher, cfg.data.batch_size
    lambda_cls = tcfg.lambda_cls if lambda_cls is None else lambda_cls
    lambda_rec = tcfg.lambda_rec if lambda_rec is None else lambda_rec
    start = time.perf_counter()
    with strategy.scope():
        backbone = models.get(tcfg.model, data.num_classes, data.image_shape, cfg.sync_batchnorm)
        teacher = ReconstructionTeacher(backbone, lambda_cls=lambda_cls, lambda_rec=lambda_rec,
                                        pixel_mean=data.mean.tolist(), pixel_std=data.std.tolist(),
                                        name=name)
        optimizer = _sgd(tcfg.optimizer, batch, len(data.train_labels) // batch, tcfg.epochs)
        teacher.compile(optimizer=optimizer)
        teacher(data.normalize(data.train_images[:2]))  # build, so a backup can be restored
        optimizer.build(teacher.trainable_variables)
    sample = data.test_images[np.linspace(0, len(data.test_images) - 1, 10).astype(int)]
    plots = [callbacks.ReconstructionPlot(sample, data.mean, data.std, out_dir / "reconstructions.png")] \
        if lambda_rec > 0 else []
    history, val, test, meter = _fit(teacher, cfg, data, out_dir, name, tcfg.epochs, plots)
    with io.atomic_path(out_dir / f"{name}.keras") as tmp:  # every worker saves (non-chief: its .workers copy)
        teacher.save(tmp)
    _drop_backup(out_dir, name)
    return {
        "model": tcfg.model, "lambda_cls": lambda_cls, "lambda_rec": lambda_rec,
        "epochs": tcfg.epochs, "epochs_run_here": len(history.get("loss", [])),
        "val_accuracy": val.get("accuracy"), "val_psnr": val.get("psnr"),
        "test_accuracy": test.get("accuracy"), "test_psnr": test.get("psnr"),
        "test_loss": test.get("loss"),
        "params": int(backbone.count_params()),
        "train_images_per_second": meter.images_per_second,
        "wall_seconds": time.perf_counter() - start,
    }


def teacher_plan(cfg: config_lib.RunConfig) -> list[tuple[str, float | None, float | None]]:
    """The teachers the method needs: (file stem, lambda_cls, lambda_rec); None = the config's."""
    from tfkd.distill import teachers_needed

    count = teachers_needed(cfg.distill.method)
    if count == 2:  # MKTN: Teacher1 reconstructs (autoencoder), Teacher2 classifies
        return [("teacher1", 0.0, 1.0), ("teacher2", 1.0, 0.0)]
    return [("teacher", None, None)]


def load_teacher(path: str | Path, data: Any) -> Any:
    """Loads a trained teacher (a ``.keras`` file, or a run folder holding ``teacher.keras``)
    in Keras's safe mode and returns its frozen backbone; fails fast on any mismatch."""
    from tfkd import io
    from tfkd.errors import ModelError
    from tfkd.teacher import ReconstructionTeacher

    model, path = io.load_keras(path, "teacher.keras", "teacher")
    backbone = model.backbone if isinstance(model, ReconstructionTeacher) else model
    output = getattr(backbone, "output", None)
    if not isinstance(output, dict) or "logits" not in output or "features" not in output:
        raise ModelError(f"{path}: not a tfkd teacher (expected a model with logits and stage "
                         "features, as tfkd.train writes)")
    classes = int(output["logits"].shape[-1])
    if classes != data.num_classes:
        raise ModelError(f"{path}: the teacher has {classes} classes, dataset {data.name} has "
                         f"{data.num_classes}")
    if tuple(backbone.input_shape[1:]) != data.image_shape:
        raise ModelError(f"{path}: the teacher takes {tuple(backbone.input_shape[1:])} inputs, "
                         f"the data is {data.image_shape}")
    if isinstance(model, ReconstructionTeacher):
        gap = np.abs(np.array(model.pixel_mean) - data.mean).max()
        if gap > 0.05 * float(data.std.mean()):
            raise ModelError(f"{path}: the teacher was trained with pixel mean "
                             f"{np.round(model.pixel_mean, 1).tolist()}, this data has "
                             f"{np.round(data.mean, 1).tolist()}: a teacher of another dataset?")
    backbone.trainable = False
    return backbone


def build_distiller(cfg: config_lib.RunConfig, student: Any, teachers: Sequence[Any],
                    steps_per_epoch: int) -> Any:
    """The Distiller of ``cfg.distill`` (uncompiled): the method's loss weights and every option.

    ``teachers`` are loaded backbones in command-line order (mktn: the reconstruction teacher,
    then the classifier).
    """
    from tfkd.distill import Distiller, loss_weights

    dcfg = cfg.distill
    weights = loss_weights(dcfg.method, dcfg.alpha, dcfg.beta, dcfg.gamma, dcfg.kd_alpha,
                           dcfg.hint_weight, dcfg.at_weight, dcfg.ce_weight)
    teacher = teachers[-1] if teachers else None  # mktn: Teacher2 (classifier) is second
    adversarial = teachers[0] if len(teachers) == 2 else None
    return Distiller(student, teacher, adversarial, weights, stages=dcfg.stages,
                     temperature=dcfg.temperature, gan_loss=dcfg.gan_loss,
                     sync_bn=cfg.sync_batchnorm, adapter_relu=dcfg.adapter_relu,
                     adversarial_warmup_steps=dcfg.adv_warmup_epochs * steps_per_epoch,
                     discriminator_width=dcfg.discriminator.width, name="distiller")


def train_student(cfg: config_lib.RunConfig, data: Any, strategy: Any, out_dir: Path,
                  teacher_paths: Sequence[str | Path]) -> dict[str, Any]:
    """Distills the student with the configured method; saves ``student.keras``; returns metrics."""
    from tfkd import io, models

    dcfg, scfg, batch = cfg.distill, cfg.student, cfg.data.batch_size
    start = time.perf_counter()
    with strategy.scope():
        teachers = [load_teacher(p, data) for p in teacher_paths]
        student = models.get(scfg.model, data.num_classes, data.image_shape, cfg.sync_batchnorm)
        steps_per_epoch = len(data.train_labels) // batch
        distiller = build_distiller(cfg, student, teachers, steps_per_epoch)
        optimizer = _sgd(scfg.optimizer, batch, steps_per_epoch, scfg.epochs)
        distiller.compile(optimizer=optimizer,
                          discriminator_optimizer=discriminator_optimizer(dcfg.discriminator))
        distiller.build_all()
    history, val, test, meter = _fit(distiller, cfg, data, out_dir, "distill", scfg.epochs, [])
    with io.atomic_path(out_dir / "student.keras") as tmp:  # every worker saves (non-chief: its .workers copy)
        student.save(tmp)
    _drop_backup(out_dir, "distill")
    last = {k: v[-1] for k, v in history.items() if k.startswith("d_")}
    return {
        "method": dcfg.method, "model": scfg.model, "teachers": [str(p) for p in teacher_paths],
        "terms": {t: getattr(distiller.loss_weights, t) for t in distiller.terms}, "stages": dcfg.stages,
        "epochs": scfg.epochs, "epochs_run_here": len(history.get("loss", [])),
        "val_accuracy": val.get("accuracy"), "test_accuracy": test.get("accuracy"),
        "test_loss": test.get("loss"), "params": int(student.count_params()),
        "train_images_per_second": meter.images_per_second, **last,
        "wall_seconds": time.perf_counter() - start,
    }


def _drop_backup(out_dir: Path, stage: str) -> None:
    """Removes a stage's backup once its artifact is saved (it is no longer needed to resume)."""
    import shutil

    shutil.rmtree(out_dir / "backup" / stage, ignore_errors=True)
    _remove_if_empty(out_dir / "backup")


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _check_finite(history: dict[str, list[float]], stage: str) -> None:
    import math

    from tfkd.errors import TrainingError

    losses = history.get("loss", [])
    if losses and not math.isfinite(losses[-1]):
        raise TrainingError(f"{stage}: the loss became {losses[-1]} in epoch {len(losses)}; "
                            "lower the learning rate (the last good backup is kept)")


def _stage_metrics(run_dir: Path, stage: str) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()).get("stages", {}).get(stage, {}) if path.is_file() else {}


def _trained_teacher(run_dir: Path, out_dir: Path, name: str) -> Path:
    """This run's teacher ``name``: a non-chief worker reads the copy it trained itself."""
    local = out_dir / f"{name}.keras"
    return local if local.is_file() else run_dir / f"{name}.keras"


def _done(run_dir: Path, stage: str) -> None:
    from tfkd import io

    io.write_json(run_dir / "status.json", {"stage": stage, "phase": "done", "time": time.time()})


def _skip(artifact: Path, stage: str) -> bool:
    if artifact.is_file():
        print(f"tfkd: {artifact} exists: skipping the {stage} stage (remove it, or choose "
              "another --run-dir, to train again)")
        return True
    return False


def run(cfg: config_lib.RunConfig) -> dict[str, Any]:
    """Runs the configured stage(s); returns the metrics of the last stage run."""
    from tfkd.strategy import is_chief, make_strategy, task_name

    strategy = make_strategy(cfg.strategy)  # first: multi-worker must start before other ops
    import keras

    from tfkd import data as data_lib
    from tfkd import io
    from tfkd.distill import teachers_needed

    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    chief = is_chief(strategy)
    run_dir = Path(cfg.run_dir)
    data = data_lib.prepare(cfg.data.dataset, cfg.data.data_dir, cfg.data.image_size,
                            cfg.data.validation_fraction, cfg.seed, cfg.data.hflip,
                                cfg.data.subset)
    # A non-chief worker writes its own copies (never read by users) in a folder of its own that
    # survives a restart: its backups let it resume at the same epoch as the chief.
    out_dir = run_dir if chief else run_dir / ".workers" / task_name(strategy)
    out_dir.mkdir(parents=True, exist_ok=True)
    if chief:
        io.write_text(run_dir / "config.yaml", config_lib.to_yaml(cfg))
        io.write_json(run_dir / "dataset.json", data.info())
    plan = teacher_plan(cfg)
    needed = teachers_needed(cfg.distill.method)
    metrics: dict[str, Any] = {}
    train_teachers = cfg.stage == "teacher" or (cfg.stage == "all" and needed and not cfg.distill.teachers)
    if train_teachers:
        for name, lambda_cls, lambda_rec in plan:
            if _skip(run_dir / f"{name}.keras", name):
                metrics = _stage_metrics(run_dir, name)
                continue
            metrics = train_teacher(cfg, data, strategy, out_dir, name, lambda_cls, lambda_rec)
            if chief:
                _update_metrics(run_dir, name, metrics)
                _done(run_dir, name)
    if cfg.stage in ("distill", "all"):
        teacher_paths = list(cfg.distill.teachers) or (
            [_trained_teacher(run_dir, out_dir, name) for name, _, _ in plan] if needed else [])
        if _skip(run_dir / "student.keras", "distill"):
            return _stage_metrics(run_dir, "distill")
        metrics = train_student(cfg, data, strategy, out_dir, teacher_paths)
        if chief:
            _update_metrics(run_dir, "distill", metrics)
            _done(run_dir, "distill")
    if cfg.stage in ("export", "all") and chief:
        metrics = export_student(cfg, run_dir, data)
    return metrics


def export_student(cfg: config_lib.RunConfig, run_dir: Path, data: Any) -> dict[str, Any]:
    """Exports ``run_dir/student.keras`` to ``run_dir/export`` (see ``tfkd.export``)."""
    from tfkd import export

    ecfg = cfg.export
    card = export.export(run_dir / "student.keras", run_dir / "export", ecfg.formats,
                         cfg.data.data_dir, ecfg.opset, ecfg.representative, ecfg.int8_io,
                         ecfg.tolerance, ecfg.max_test_images, data=data)
    summary = {fmt: {k: entry[k] for k in ("bytes", "top1", "agreement_with_keras",
                                            "max_abs_logit_diff", "batch1_latency_ms")}
               for fmt, entry in card["formats"].items()}
    metrics = {"folder": str(run_dir / "export"), "formats": summary,
               "keras_top1": card["keras"]["top1"],
               "keras_batch1_latency_ms": card["keras"]["batch1_latency_ms"]}
    headline = {**_stage_metrics(run_dir, "distill"), "export": metrics}
    _update_metrics(run_dir, "export", metrics, headline)  # the student's figures stay on top
    return headline


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.print_config:
            print(config_lib.to_yaml(cfg), end="")
            return 0
        metrics = run(cfg)
    except TfkdError as error:
        print(f"tfkd: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("tfkd: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    summary = {k: v for k, v in metrics.items() if k in ("val_accuracy", "test_accuracy", "test_psnr")}
    print(f"tfkd: done: {cfg.run_dir} {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
