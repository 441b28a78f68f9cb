"""The pipeline in a run folder: the teacher stage, the distill stage and the export stage.

``run(cfg)`` runs the configured stage(s) in order: ``teacher`` trains the teacher(s) the method
needs (one reconstruction-augmented teacher; for ``mktn`` Teacher1, an autoencoder, and
Teacher2, a plain classifier), ``distill`` trains the student with the method's loss terms,
``export`` writes and verifies the student's edge formats in ``export/``; ``all`` runs the three.
``python -m tfkd.train`` and the notebooks call it; ``tfkd.compress`` and ``tfkd.bench`` reuse
its teacher loading.

Run directory layout (every file written atomically):

- ``config.yaml``, ``dataset.json``: the resolved configuration of the last command; class
  names, split sizes and the normalization constants
- ``run.json``: what each artifact was made with (the settings each stage read; ``tfkd.rundir``)
- ``teacher.keras`` (``teacher1.keras`` + ``teacher2.keras`` for mktn): trained teachers
- ``student.keras``: the distilled student alone (no adapters, no discriminators)
- ``backup/<stage>/``: ``BackupAndRestore`` state while a stage trains (everything needed to
  resume: weights, adapters, discriminators, both optimizers' state); a killed run resumes
- ``<stage>_log.csv`` and ``tensorboard/<stage>/``: per-epoch metrics
- ``reconstructions.png``: test images over the teacher's reconstructions
- ``export/``: SavedModel, TFLite, ONNX, labels and model card (see ``tfkd.export``)
- ``metrics.json``: the last stage's headline metrics at top level, every stage's under ``stages``
- ``status.json``: what the run is doing now (stage, phase, epoch), or ``done``
- ``.lock``: the process training here (``tfkd.rundir.RunLock``)

A stage whose artifact exists and whose settings match its record is skipped, so re-running a
finished command is cheap and re-running an interrupted one continues where it stopped; a
re-run with other settings is refused, naming them (``retrain=True`` trains the stage again).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tfkd import config as config_lib
from tfkd import health


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


def _fit(model: Any, cfg: config_lib.RunConfig, data: Any, out_dir: Path, stage: str, epochs: int,
         extra_callbacks: list[Any], with_index: bool = False, with_strong: bool = False, keep: Any = None,
         precise_bn: Any = None, replicas: int = 1
         ) -> tuple[dict[str, list[float]], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Fits ``model`` with the run's callbacks; returns (history, val metrics, test metrics,
    record): the record's ``train_images_per_second``, ``epochs_seconds`` (the stage's epochs
    summed across resumes) and, with ``precise_bn`` (a ``PreciseBNConfig``) enabled, what
    re-estimating the batch-norm statistics of ``keep`` (the model the stage saves) did, on
    batches of the per-replica size (``replicas``), before the final evaluation.
    ``with_index``: training batches carry each example's index in the split (memory banks);
    ``with_strong``: they carry a strongly augmented second view too (MLKD)."""
    import keras

    from tfkd import callbacks

    batch = cfg.data.batch_size
    recalibration = []
    if precise_bn is not None and precise_bn.enabled:
        recalibration = [callbacks.PreciseBatchNorm(
            keep, lambda: data.sample("train", precise_bn.images, seed=cfg.seed),
            max(2, batch // max(1, replicas)), data.normalize)]
    train_ds = data.train_dataset(batch, cfg.seed, cfg.data.augment, cfg.data.shuffle_buffer, with_index,
                                  with_strong)
    val_ds = data.eval_dataset("val", batch) if data.count("val") else None
    meter = callbacks.ThroughputMeter(batch)
    status = callbacks.RunStatus(out_dir / "status.json", stage, epochs)
    clock = callbacks.EpochClock(out_dir / f"{stage}_seconds.json")
    chief_backup = Path(cfg.run_dir) / "backup" / stage
    own_backup = out_dir / "backup" / stage
    cbs = [
        clock,  # before the backup: a kill between the two re-trains an epoch whose time was kept
        # the epoch's log row before its backup too: a kill between the two logs an epoch twice
        # (the last row counts), never an epoch the resumed run skips
        *([callbacks.TestEveryEpoch(data.eval_dataset("test", batch))] if cfg.data.test_every_epoch else []),
        keras.callbacks.CSVLogger(str(out_dir / f"{stage}_log.csv"), append=True),
        # The backup outlives fit (delete_checkpoint=False) until the artifact is saved, so a run
        # killed during the final evaluation resumes there instead of training again. Every
        # worker resumes from the chief's backup: a worker killed between an epoch's last step
        # and its own backup would otherwise restart an epoch behind the others.
        callbacks.AtomicBackupAndRestore(
            str(own_backup), delete_checkpoint=False,
            restore_from=None if own_backup.resolve() == chief_backup.resolve() else str(chief_backup),
            train_data=train_ds),
        callbacks.NanGuard(stage, out_dir / "backup" / stage),
        status,
        keras.callbacks.TensorBoard(str(out_dir / "tensorboard" / stage), profile_batch=0),
        meter, *recalibration, *extra_callbacks,  # the statistics first: pictures show the kept model
    ]
    verbose = cfg.progress if cfg.progress is not None else (1 if sys.stdout.isatty() else 2)
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=cbs,
                        verbose=verbose, shuffle=False).history  # the dataset shuffles itself
    _check_finite(history, stage)
    status.write("evaluate")
    test = model.evaluate(data.eval_dataset("test", batch), verbose=0, return_dict=True) \
        if cfg.data.evaluate_test else {}
    if cfg.data.evaluate_test:  # per-image predictions: paired comparisons of runs (tfkd.bench)
        logits = predict_logits(model, data.eval_dataset("test", batch))
        from tfkd import io

        with io.atomic_path(out_dir / "test_predictions.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, predictions=np.argmax(logits, 1).astype(np.int32),
                         labels=data.test_labels.astype(np.int32))
    val = model.evaluate(val_ds, verbose=0, return_dict=True) if val_ds is not None else {}
    status.write("save")
    record: dict[str, Any] = {"train_images_per_second": meter.images_per_second, "epochs_seconds": clock.total}
    if recalibration:
        record["precise_bn"] = recalibration[0].record
    if cfg.data.test_every_epoch:  # the best epoch (its moving statistics), across resumes
        best = callbacks.best_epoch(out_dir / f"{stage}_log.csv")
        record["best_epoch"] = None if best is None else best["epoch"] + 1
        record["best_epoch_test_accuracy"] = None if best is None else best["test_accuracy"]
    return history, val, test, record


def predict_logits(model: Any, dataset: Any) -> np.ndarray:
    """The logits of ``model`` (a model returning ``{"logits", ...}``) on every batch of
    ``dataset`` ((images, labels) batches), in order. Only the logits are kept: ``predict``
    would gather every output, and a teacher's reconstructions and feature maps of 10,000 test
    images at 96 px are gigabytes."""
    import tensorflow as tf

    step = tf.function(lambda x: model(x, training=False)["logits"])
    return np.concatenate([np.asarray(step(x)) for x, _ in dataset], axis=0)


def _judge(what: str, history: dict[str, list[float]], val: dict[str, Any], test: dict[str, Any],
           data: Any, record: dict[str, Any]) -> list[str]:
    """Prints what precise batch norm changed and returns the warnings the stage's accuracy
    calls for (``tfkd.health``): judged on the validation split, else on the test split."""
    from tfkd import health

    split, top1 = ("validation", val.get("accuracy")) if val else ("test", test.get("accuracy"))
    recalibrated = record.get("precise_bn")
    if recalibrated and recalibrated.get("layers"):
        before = recalibrated.get("val_accuracy_before")
        change = (f": validation top-1 {before:.2%} with the moving averages, {top1:.2%} now"
                  if before is not None and val else "")
        print(f"tfkd: precise batch norm: {recalibrated['layers']} layers of {what} re-estimated on "
              f"{recalibrated['images']} training images{change}", flush=True)
    train_top1 = history.get("accuracy", [None])[-1] if history.get("accuracy") else None
    labels = data.labels("val") if val else (data.labels("test") if test else [])
    return health.accuracy_warnings(what, top1, labels, split, train_top1)


def train_teacher(cfg: config_lib.RunConfig, data: Any, strategy: Any, out_dir: Path,
                  name: str = "teacher", lambda_cls: float | None = None,
                  lambda_rec: float | None = None) -> dict[str, Any]:
    """Trains a reconstruction-augmented teacher saved as ``<name>.keras``; returns its metrics.

    ``lambda_cls``/``lambda_rec`` default to the config's (MKTN's teachers override them). With
    ``teacher.init_from`` the backbone starts from that trained classifier (fed what it expects)
    and only the decoder starts fresh; the backbone then has an optimizer of its own, at
    ``teacher.backbone_lr_scale`` times the rate and still for ``teacher.freeze_epochs``.
    """
    from tfkd import callbacks, io, models, optimizers, precision
    from tfkd.teacher import ReconstructionTeacher

    tcfg, batch = cfg.teacher, cfg.data.batch_size
    lambda_cls = tcfg.lambda_cls if lambda_cls is None else lambda_cls
    lambda_rec = tcfg.lambda_rec if lambda_rec is None else lambda_rec
    start = time.perf_counter()
    steps_per_epoch = data.steps_per_epoch(batch)
    initial: dict[str, Any] = {}
    with strategy.scope():
        if tcfg.init_from:
            backbone = load_teacher(tcfg.init_from, data, "init", cfg.distill)
            backbone.trainable = True
            initial = _accuracies(backbone, data, batch)
            print(f"tfkd: {tcfg.init_from} starts the {name}: test top-1 "
                  f"{initial.get('init_test_accuracy', float('nan')):.2%} before the fine-tune")
        else:
            backbone = models.get(tcfg.model, data.num_classes, data.image_shape, cfg.sync_batchnorm,
                                  weights=tcfg.weights, normalization=(data.mean, data.std),
                                  layers=cfg.distill.teacher_layers)
        from tfkd.models import applications

        fresh_head = applications.HEAD_LAYERS if applications.is_application(tcfg.model) \
            and not tcfg.init_from else ()
        teacher = ReconstructionTeacher(backbone, lambda_cls=lambda_cls, lambda_rec=lambda_rec,
                                        pixel_mean=data.mean.tolist(), pixel_std=data.std.tolist(),
                                        head_layers=fresh_head, name=name)
        optimizer = optimizers.stage_sgd(tcfg.optimizer, batch, steps_per_epoch, tcfg.epochs)
        separate = bool(tcfg.init_from) or tcfg.backbone_lr_scale != 1.0 or tcfg.freeze_epochs > 0
        backbone_optimizer = optimizers.backbone_sgd(tcfg, batch, steps_per_epoch) if separate else None
        teacher.compile(optimizer=optimizer, backbone_optimizer=backbone_optimizer)
        teacher(data.normalize(data.sample("train", 2)))  # build, so a backup can be restored
        teacher.build_optimizers()
    sample = data.spread("test", 10)
    plots = [callbacks.ReconstructionPlot(sample, data.mean, data.std, out_dir / "reconstructions.png")] \
        if lambda_rec > 0 else []
    history, val, test, timing = _fit(teacher, cfg, data, out_dir, name, tcfg.epochs, plots, keep=teacher,
                                      precise_bn=tcfg.precise_bn, replicas=strategy.num_replicas_in_sync)
    warnings = _judge(f"the {name}", history, val, test, data, timing)
    with io.atomic_path(out_dir / f"{name}.keras") as tmp:  # every worker saves (non-chief: its .workers copy)
        precision.with_policy(teacher).save(tmp)  # float32 whatever it trained in
    _drop_backup(out_dir, name)
    return {
        "model": backbone.name if tcfg.init_from else tcfg.model, "lambda_cls": lambda_cls,
        "lambda_rec": lambda_rec, "init_from": tcfg.init_from, **initial,
        "epochs": tcfg.epochs, "epochs_run_here": len(history.get("loss", [])),
        "val_accuracy": val.get("accuracy"), "val_psnr": val.get("psnr"),
        "test_accuracy": test.get("accuracy"), "test_psnr": test.get("psnr"),
        "test_loss": test.get("loss"),
        "params": int(backbone.count_params()),
        "wall_seconds": time.perf_counter() - start, **timing, "warnings": warnings,
    }


def _accuracies(model: Any, data: Any, batch: int) -> dict[str, float]:
    """Top-1 of a ``{"logits", ...}`` model on the validation and test splits (before a fine-tune)."""
    found = {}
    for split in ("val", "test"):
        labels = data.labels(split)
        if len(labels):
            logits = predict_logits(model, data.eval_dataset(split, batch))
            found[f"init_{split}_accuracy"] = float(np.mean(np.argmax(logits, 1) == labels))
    return found


def teacher_plan(cfg: config_lib.RunConfig) -> list[tuple[str, float | None, float | None]]:
    """The teachers the method needs, as ``--stage teacher`` trains them: (file stem, lambda_cls,
    lambda_rec), None = the config's; ``teacher`` for one, ``teacher1``, ``teacher2``, ... for
    several (each role's recipe: ``tfkd.distill.methods.ROLE_RECIPES``)."""
    from tfkd.distill import methods

    roles = methods.resolve(cfg.distill.method).teachers or ("teacher",)
    plan = []
    for i, role in enumerate(roles):
        recipe = methods.ROLE_RECIPES.get(role)
        plan.append(("teacher" if len(roles) == 1 else f"teacher{i + 1}",
                     *(recipe if recipe is not None else (None, None))))
    return plan


def _note(message: str) -> None:
    """A one-line remark about a decision taken for the user (stdout, like the progress)."""
    print(f"tfkd: note: {message}", flush=True)


def load_teacher(path: str | Path, data: Any, role: str = "teacher", distill: Any = None) -> Any:
    """Loads a trained teacher (a ``.keras`` file, or a run folder holding ``teacher.keras``)
    in Keras's safe mode and returns its frozen backbone, fed what it expects; fails fast on
    any mismatch.

    ``role`` is what the method uses it for: ``reconstruction`` (cft's teacher, mktn's Teacher1:
    its features should come from reconstruction training) or ``teacher`` (its logits and
    features). Any functional Keras classifier is accepted: a model that is not a tfkd model is
    tapped (``tfkd.models.taps``; ``distill.teacher_layers``, ``distill.teacher_output``). What
    the model takes is read from it (``tfkd.models.wrap``) unless ``distill.teacher_input``
    says: a tfkd teacher its stored normalization, a model starting with a preprocessing layer
    [0, 255] pixels, a KerasHub task what its separate preprocessor's image converter makes of
    them, a model with a run folder that folder's normalization (``dataset.json``). A model
    built for any image size is read at this run's size (``taps.at_size``).
    A teacher trained on another dataset is refused when its record says so (its normalization,
    ``dataset.json`` beside it, or the class names of an imported model's ``<name>.json``); a
    teacher with no such record, or a plain classifier where reconstruction features are
    expected, is accepted with a note. Every decision is logged.
    """
    from tfkd import io, rundir
    from tfkd.errors import ConfigError, ModelError
    from tfkd.models import taps, wrap
    from tfkd.teacher import ReconstructionTeacher

    distill = distill if distill is not None else config_lib.DistillConfig()
    layers, output, told_input = list(distill.teacher_layers), distill.teacher_output, distill.teacher_input
    model, path = io.load_keras(path, "teacher.keras", "teacher")
    backbone = model.backbone if isinstance(model, ReconstructionTeacher) else model
    if not taps.is_tfkd_model(backbone) or layers:
        sized = taps.at_size(backbone, *data.image_shape[:2])
        if sized is not backbone:
            _note(f"{path} takes images of any size: reading it at this run's {data.image_shape[0]}x"
                  f"{data.image_shape[1]} (data.image_size)")
        backbone, how = taps.tap(sized, layers, output, path=str(path))
        _note(f"{path}: {how}")
    classes = int(backbone.output["logits"].shape[-1])
    if classes != data.num_classes:
        raise ModelError(f"{path}: the teacher has {classes} classes, dataset {data.name} has "
                         f"{data.num_classes}")
    if tuple(backbone.input_shape[1:]) != data.image_shape:
        raise ModelError(f"{path}: the teacher takes {tuple(backbone.input_shape[1:])} inputs, "
                         f"the data is {data.image_shape} (set data.image_size to the teacher's size)")
    try:
        record = rundir.read_dataset_record(path.parent)
    except ConfigError as error:
        raise ModelError(str(error)) from None
    imported = io.read_model_record(path)
    if record is not None:
        found = rundir.dataset_differences(record, data.info())
        if found:
            raise ModelError(f"{path}: trained on another dataset than this run's {data.name} "
                             f"({found[0]}, says {path.parent / 'dataset.json'})")
    if imported is not None and imported.get("class_names") not in (None, data.class_names):
        raise ModelError(f"{path}: classifies {imported['class_names'][:3]}..., this run's {data.name} "
                         f"has {data.class_names[:3]}... (says {io.model_record_path(path)})")
    builtin = wrap.builtin_preprocessing(backbone)
    separate = wrap.separate_preprocessing(model, str(path))
    if told_input != "auto":
        convention = (wrap.InputConvention(tuple(data.mean.tolist()), tuple(data.std.tolist()), "told: dataset")
                      if told_input == "dataset" else wrap.named(told_input, f"told: {told_input}"))
        _note(f"{path}: feeding it {told_input} pixels (distill.teacher_input)")
    elif isinstance(model, ReconstructionTeacher):
        gap = np.abs(np.array(model.pixel_mean) - data.mean).max()
        if gap > 0.05 * float(data.std.mean()):
            raise ModelError(f"{path}: the teacher was trained with pixel mean "
                             f"{np.round(model.pixel_mean, 1).tolist()}, this data has "
                             f"{np.round(data.mean, 1).tolist()}: a teacher of another dataset?")
        convention = wrap.InputConvention(tuple(model.pixel_mean), tuple(model.pixel_std),
                                          "the normalization it was trained with")
    elif builtin is not None:
        convention = wrap.pixels(f"{builtin}")
        _note(f"{path} {builtin}: feeding it [0, 255] pixels")
    elif separate is not None:
        convention = separate
        _note(f"{path}: feeding it what {separate.reason} makes of [0, 255] pixels")
    elif record is not None:
        convention = wrap.InputConvention(tuple(record["mean"]), tuple(record["std"]),
                                          "the normalization of its run folder")
    else:
        convention = wrap.InputConvention(tuple(data.mean.tolist()), tuple(data.std.tolist()), "assumed")
        if imported is None:
            _note(f"{path} holds no record of its training data (no dataset.json beside it) and "
                  f"does not start with a preprocessing layer: assuming it was trained on "
                  f"{data.name}'s {data.num_classes} classes in this order, with this run's "
                  "normalization (say otherwise with distill.teacher_input)")
    reconstructs = isinstance(model, ReconstructionTeacher) and model.lambda_rec > 0
    classifies = not isinstance(model, ReconstructionTeacher) or model.lambda_cls > 0
    if role == "reconstruction" and not reconstructs:
        _note(f"{path} was not trained with reconstruction: the feature and adversarial terms "
              "mimic a plain classifier's features (no reconstruction features)")
    if role == "teacher" and not classifies:
        _note(f"{path} was trained without classification (an autoencoder): its logits are "
              "untrained, so logit terms learn nothing useful from it")
    backbone.trainable = False
    fed = wrap.feed(backbone, data.mean, data.std, convention, name=backbone.name)
    fed.trainable = False
    return fed


def teacher_roles(method: str) -> list[str]:
    """What each of ``method``'s teachers is for, in command-line order (see ``load_teacher``):
    ``reconstruction`` (cft) and ``autoencoder`` (mktn's Teacher1) features come from
    reconstruction training, the others are read for their logits and features."""
    from tfkd.distill import methods

    return ["reconstruction" if role in ("reconstruction", "autoencoder") else "teacher"
            for role in methods.resolve(method).teachers]


def build_distiller(cfg: config_lib.RunConfig, student: Any, teachers: Sequence[Any],
                    steps_per_epoch: int, train_labels: Any = None) -> Any:
    """The Distiller of ``cfg.distill`` (uncompiled): the method and its options
    (``tfkd.distill.from_config``); ``teachers`` are loaded backbones in command-line order."""
    from tfkd.distill import from_config

    return from_config(cfg.distill, student, teachers, steps_per_epoch, train_labels, cfg.sync_batchnorm)


def load_teachers(cfg: config_lib.RunConfig, data: Any, strategy: Any,
                  teacher_paths: Sequence[str | Path]) -> list[Any]:
    """The method's teachers, loaded and checked (``load_teacher``) in ``strategy``'s scope."""
    with strategy.scope():
        return [load_teacher(p, data, role, cfg.distill) for p, role in
                zip(teacher_paths, teacher_roles(cfg.distill.method))]


def train_student(cfg: config_lib.RunConfig, data: Any, strategy: Any, out_dir: Path,
                  teacher_paths: Sequence[str | Path], teachers: Sequence[Any] | None = None) -> dict[str, Any]:
    """Distills the student with the configured method; saves ``student.keras``; returns metrics.
    ``teachers`` are the loaded ``teacher_paths`` when the caller has them already."""
    from tfkd import io, models, optimizers, precision

    dcfg, scfg, batch = cfg.distill, cfg.student, cfg.data.batch_size
    start = time.perf_counter()
    if teachers is None:
        teachers = load_teachers(cfg, data, strategy, teacher_paths)
    with strategy.scope():
        student = models.get(scfg.model, data.num_classes, data.image_shape, cfg.sync_batchnorm,
                             weights=scfg.weights, normalization=(data.mean, data.std),
                             layers=cfg.distill.student_layers)
        steps_per_epoch = data.steps_per_epoch(batch)
        distiller = build_distiller(cfg, student, teachers, steps_per_epoch, lambda: data.train_labels)
        optimizer = optimizers.stage_sgd(scfg.optimizer, batch, steps_per_epoch, scfg.epochs)
        separate = scfg.backbone_lr_scale != 1.0 or scfg.freeze_epochs > 0
        distiller.compile(optimizer=optimizer,  # a term with an optimizer of its own built it
                          backbone_optimizer=optimizers.backbone_sgd(scfg, batch, steps_per_epoch) if separate else None)
        distiller.build_all()
    teacher_top1 = _teacher_accuracies(teacher_paths, teachers, data, batch, dcfg.method)
    history, val, test, timing = _fit(distiller, cfg, data, out_dir, "distill", scfg.epochs, [],
                                      with_index=distiller.needs_index, keep=student,
                                      with_strong=distiller.needs_strong_view or cfg.data.strong_view,
                                      precise_bn=scfg.precise_bn, replicas=strategy.num_replicas_in_sync)
    warnings = _judge("the student", history, val, test, data, timing)
    with io.atomic_path(out_dir / "student.keras") as tmp:  # every worker saves (non-chief: its .workers copy)
        precision.with_policy(student).save(tmp)  # float32 whatever it trained in: exports are float32
    _drop_backup(out_dir, "distill")
    last = {k: v[-1] for k, v in history.items() if k.startswith("d_")}
    return {
        "method": dcfg.method, "model": scfg.model, "teachers": [str(p) for p in teacher_paths],
        "term_settings": {t.name: t.config() for t in distiller.terms},
        "terms": dict(distiller.weights_by_term),
        "epochs": scfg.epochs, "epochs_run_here": len(history.get("loss", [])),
        "val_accuracy": val.get("accuracy"), "test_accuracy": test.get("accuracy"),
        "test_loss": test.get("loss"), "params": int(student.count_params()),
        "teacher_val_accuracy": [t["top1"] for t in teacher_top1],
        **last, "wall_seconds": time.perf_counter() - start, **timing,
        "warnings": [w for t in teacher_top1 for w in t["warnings"]] + warnings,
    }


def _teacher_accuracies(paths: Sequence[str | Path], teachers: Sequence[Any], data: Any,
                        batch: int, method: str) -> list[dict[str, Any]]:
    """Each teacher's top-1 on this run's validation split (else its test split), printed: the
    teacher as this run feeds it, so a wrong input convention or class order shows at once.
    An autoencoder (mktn's Teacher1) is not judged: its logits are untrained by design."""
    from tfkd import health
    from tfkd.distill import methods

    split = "val" if data.count("val") else "test"
    labels = data.labels(split)
    found = []
    for path, teacher, role in zip(paths, teachers, methods.resolve(method).teachers):
        if not len(labels):
            found.append({"top1": None, "warnings": []})
            continue
        logits = predict_logits(teacher, data.eval_dataset(split, batch))
        top1 = float(np.mean(np.argmax(logits, 1) == labels))
        warnings = [] if role == "autoencoder" else health.accuracy_warnings(
            f"the teacher {path}", top1, labels, "validation" if split == "val" else "test")
        print(f"tfkd: teacher {path}: top-1 {top1:.2%} on this run's "
              f"{'validation' if split == 'val' else 'test'} split", flush=True)
        found.append({"top1": top1, "warnings": warnings})
    return found


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


#: Per stage, the config sections only that stage reads: what ``config.yaml`` keeps from an
#: artifact's record when the last command did not run that stage.
_OWN_SECTIONS = {"teacher": ("teacher.",), "distill": ("student.", "distill."), "export": ("export.",)}


def _describe_folder(cfg: config_lib.RunConfig, records: dict[str, Any], running: set[str]) -> str:
    """``config.yaml`` for the folder: this command's configuration, except that the sections
    only a stage not run now reads keep the values its artifact was made with."""
    from omegaconf import OmegaConf

    conf = OmegaConf.structured(cfg)
    for stage, record in records.items():
        if stage in running or record.get("status") != "done" or stage in ("teacher1", "teacher2"):
            continue
        for key, value in record.get("settings", {}).items():
            if key.startswith(_OWN_SECTIONS.get(stage, ())) and key != "distill.teachers":
                try:
                    OmegaConf.update(conf, key, value, merge=False)
                except Exception:  # a key of an older tfkd: the record in run.json keeps it
                    pass
    return OmegaConf.to_yaml(conf)


class _Stage:
    """One stage of this command: its name, artifact, the settings it reads and what to do."""

    def __init__(self, name: str, artifact: Path, settings: dict[str, Any] | None) -> None:
        self.name, self.artifact, self.settings = name, artifact, settings
        self.retrain = False


def _check_folder(run_dir: Path, data: Any, stages: list[_Stage], retrain: bool) -> dict[str, Any]:
    """Refuses a folder that holds another dataset, or a stage whose artifact (or interrupted
    backup) was made with other settings, naming them; with ``retrain`` such stages are marked
    to train again. Returns the folder's records."""
    from tfkd import rundir
    from tfkd.errors import ConfigError

    records = rundir.load_records(run_dir)
    previous = rundir.read_dataset_record(run_dir)
    holds_artifacts = any((run_dir / f).exists() for f in ("teacher.keras", "teacher1.keras",
                                                          "teacher2.keras", "student.keras", "backup"))
    if previous is not None and holds_artifacts:
        found = rundir.dataset_differences(previous, data.info())
        if found:
            raise ConfigError(f"{run_dir}: holds a run on another dataset ({'; '.join(found[:2])}); "
                              "choose another --run-dir")
    for stage in stages:
        backup = run_dir / "backup" / stage.name
        if stage.settings is None or not (stage.artifact.exists() or backup.exists()):
            continue
        recorded = records[stage.name]["settings"] if stage.name in records else \
            rundir.recorded_settings(run_dir, stage.name)
        found = rundir.differences(recorded, stage.settings)
        if not found:
            continue
        if not retrain:
            what = stage.artifact.name if stage.artifact.exists() else f"an interrupted {stage.name} stage"
            raise ConfigError(f"{run_dir}: {what} was made with other settings ({'; '.join(found[:3])}"
                              f"{'; ...' if len(found) > 3 else ''}); add --retrain to train the "
                              f"{stage.name} stage again, or choose another --run-dir")
        stage.retrain = True
        print(f"tfkd: --retrain: the {stage.name} stage trains again ({'; '.join(found[:3])})")
    return records


def _skip(stage: _Stage) -> bool:
    if stage.artifact.exists() and not stage.retrain:
        print(f"tfkd: {stage.artifact} exists: skipping the {stage.name} stage (--retrain with "
              "other settings trains it again, or choose another --run-dir)")
        return True
    return False


def run(cfg: config_lib.RunConfig, retrain: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Runs the configured stage(s) in ``cfg.run_dir``; returns the metrics of the last stage run.

    Nothing is written before the data and any given teacher files have loaded and checked out;
    then the folder is locked for this process, checked against what it holds (``retrain``
    trains a stage with other settings again) and described in ``config.yaml``/``dataset.json``.
    ``verbose`` shows TensorFlow's own start-up log. Models are built and trained under the
    ``mixed_precision`` dtype policy (``tfkd.precision``), which is restored afterwards.
    """
    from tfkd import cli

    cli.import_tensorflow(verbose)
    from tfkd import precision

    with precision.policy_scope(cfg.mixed_precision):
        return _run_stages(cfg, retrain)


def _run_stages(cfg: config_lib.RunConfig, retrain: bool) -> dict[str, Any]:
    import shutil

    from tfkd import cli, rundir
    from tfkd.errors import ConfigError

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
    from tfkd.models.applications import check_weights

    side = cfg.data.image_size or 224  # the size the weights file is chosen for (its default)
    for part in ([cfg.teacher] if cfg.stage in ("teacher", "all") else []) + \
            ([cfg.student] if cfg.stage in ("distill", "all") else []):
        key = "teacher" if part is cfg.teacher else "student"
        check_weights(f"{key}.weights", part.model, part.weights, (side, side, 3))  # offline: before any data
    data = data_lib.load(cfg.data, cfg.seed)
    plan = teacher_plan(cfg)
    needed = teachers_needed(cfg.distill.method)
    given = list(cfg.distill.teachers)
    distill_now = cfg.stage in ("distill", "all")
    teachers_now = cfg.stage == "teacher" or (cfg.stage == "all" and bool(needed) and not given)
    given_loaded = load_teachers(cfg, data, strategy, given) if distill_now and given else None
    # A non-chief worker writes its own copies (never read by users) in a folder of its own; it
    # resumes from the chief's backup (_fit), so all workers restart at the same epoch.
    out_dir = run_dir if chief else run_dir / ".workers" / task_name(strategy)
    try:
        lock = rundir.RunLock(out_dir, "python -m tfkd.train " + " ".join(sys.argv[1:])).acquire()
    except OSError as error:
        raise ConfigError(f"run_dir {cfg.run_dir}: {cli.os_error_message(error)}") from None
    if lock.took_over:
        print(f"tfkd: {out_dir}: took over the lock of process {lock.took_over.get('pid')}, which "
              "is no longer running")
    try:
        def run_teachers() -> list[Any]:
            """The distill stage's teachers: given, or this run's (a non-chief worker's own copies)."""
            return given or ([_trained_teacher(run_dir, out_dir, name) for name, _, _ in plan]
                             if needed else [])

        teacher_paths = run_teachers()
        stages = [_Stage(name, run_dir / f"{name}.keras", rundir.stage_settings(
                      cfg, name, None if lc is None else (lc, lr))) for name, lc, lr in plan] \
            if teachers_now else []
        if distill_now:
            new_teachers = teachers_now and any(not s.artifact.exists() for s in stages)
            settings = None if new_teachers else rundir.stage_settings(cfg, "distill", teachers=teacher_paths)
            stages.append(_Stage("distill", run_dir / "student.keras", settings))
        # the chief decides for the cluster: other workers keep their copies in their own folder
        records = _check_folder(run_dir, data, stages, retrain) if chief else {}
        if chief and distill_now and stages[-1].artifact.exists() and (
                new_teachers or any(s.retrain for s in stages[:-1])):
            if not retrain:  # its teachers are trained (again) by this command
                raise ConfigError(f"{run_dir}: student.keras was distilled from other teachers than "
                                  "the ones this command trains; add --retrain to distill it again, "
                                  "or choose another --run-dir")
            stages[-1].retrain = True
        for stage in stages:
            if stage.retrain:
                shutil.rmtree(out_dir / "backup" / stage.name, ignore_errors=True)
        if chief:
            running = {s.name for s in stages} | ({"export"} if cfg.stage in ("export", "all") else set())
            io.write_text(run_dir / "config.yaml", _describe_folder(cfg, records, running))
            io.write_json(run_dir / "dataset.json", data.info())
        metrics: dict[str, Any] = {}
        judged: list[dict[str, Any]] = []  # every stage's record, for its warnings
        for stage, (name, lambda_cls, lambda_rec) in zip(stages, plan if teachers_now else []):
            if _skip(stage):
                metrics = _stage_metrics(run_dir, name)
                judged.append(metrics)
                continue
            if chief:
                rundir.write_record(run_dir, name, stage.settings, "training")
            metrics = train_teacher(cfg, data, strategy, out_dir, name, lambda_cls, lambda_rec)
            judged.append(metrics)
            if chief:
                rundir.write_record(run_dir, name, stage.settings, "done", stage.artifact.name)
                _update_metrics(run_dir, name, metrics)
                _done(run_dir, name)
                if not distill_now and (run_dir / "student.keras").exists():
                    _note(f"{run_dir / 'student.keras'} was distilled from the previous {name}; "
                          "re-run --stage distill --retrain to distill it from the new one")
        if distill_now:
            stage = stages[-1]
            if not _skip(stage):
                # again, now that the teacher stage is over: a non-chief worker reads the copy it
                # has just written itself, never the chief's (which may not be written yet)
                teacher_paths = run_teachers()
                settings = rundir.stage_settings(cfg, "distill", teachers=teacher_paths)
                if chief:
                    rundir.write_record(run_dir, "distill", settings, "training")
                metrics = train_student(cfg, data, strategy, out_dir, teacher_paths, given_loaded)
                if chief:
                    rundir.write_record(run_dir, "distill", settings, "done", stage.artifact.name)
                    _update_metrics(run_dir, "distill", metrics)
                    _done(run_dir, "distill")
            else:
                metrics = _stage_metrics(run_dir, "distill")
            judged.append(metrics)
        if cfg.stage in ("export", "all") and chief:
            export_settings = {**rundir.stage_settings(cfg, "export"),
                               "student": rundir.sha256(run_dir / "student.keras")}
            recorded = rundir.load_records(run_dir).get("export", {})
            current = (run_dir / "export" / "model_card.json").is_file() \
                and recorded.get("settings") == export_settings
            if current:
                print(f"tfkd: {run_dir / 'export'} is up to date: skipping the export stage")
                metrics = {**_stage_metrics(run_dir, "distill"), "export": _stage_metrics(run_dir, "export")}
            else:
                metrics = export_student(cfg, run_dir, data)
                rundir.write_record(run_dir, "export", export_settings, "done", "export")
            judged.append(metrics.get("export", {}))
        return {**metrics, "warnings": health.collect(*judged)}
    finally:
        lock.release()


def export_student(cfg: config_lib.RunConfig, run_dir: Path, data: Any) -> dict[str, Any]:
    """Exports ``run_dir/student.keras`` to ``run_dir/export`` (see ``tfkd.export``)."""
    from tfkd import export

    card = export.export(run_dir / "student.keras", run_dir / "export", settings=cfg.export, data=data)
    summary = {fmt: {k: entry[k] for k in ("bytes", "top1", "agreement_with_keras",
                                            "max_abs_logit_diff", "batch1_latency_ms")}
               for fmt, entry in card["formats"].items()}
    metrics = {"folder": str(run_dir / "export"), "formats": summary,
               "keras_top1": card["keras"]["top1"],
               "keras_batch1_latency_ms": card["keras"]["batch1_latency_ms"],
               "warnings": card.get("warnings", [])}
    headline = {**_stage_metrics(run_dir, "distill"), "export": metrics}
    _update_metrics(run_dir, "export", metrics, headline)  # the student's figures stay on top
    return headline
