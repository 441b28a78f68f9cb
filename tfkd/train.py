"""``python -m tfkd.train``: parse the configuration, build, fit, write the run directory.

Run directory layout (every file written atomically):

- ``config.yaml``: the resolved configuration of the last invocation
- ``dataset.json``: class names, split sizes and the normalization constants
- ``teacher.keras``: the trained reconstruction-augmented teacher (safe-mode loadable)
- ``backup/teacher/``: ``BackupAndRestore`` state while training; a killed run resumes from it
- ``teacher_log.csv``: one line per epoch; ``tensorboard/teacher/``: TensorBoard logs
- ``reconstructions.png``: test images over the teacher's reconstructions
- ``metrics.json``: the last stage's headline metrics at top level, every stage's under ``stages``

A stage whose artifact already exists is skipped, so re-running a finished command is cheap
and re-running an interrupted one continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tfkd import config as config_lib
from tfkd.errors import TfkdError

#: Dedicated flags: flag -> (config key, help). Everything else goes through --set.
FLAGS = {
    "--stage": ("stage", "what to run: teacher, or all (every stage available)"),
    "--dataset": ("data.dataset", "cifar10, cifar100, digits (offline default) or folder:PATH"),
    "--data-dir": ("data.data_dir", "folder holding the canonical CIFAR python batches; without "
                                    "it CIFAR comes from TensorFlow Datasets"),
    "--teacher-model": ("teacher.model", "teacher backbone from the model zoo"),
    "--epochs": ("epochs", "training epochs of every stage that trains"),
    "--batch-size": ("data.batch_size", "global batch size"),
    "--run-dir": ("run_dir", "output folder; re-running the same command resumes there"),
    "--strategy": ("strategy", "tf.distribute strategy: auto, default, mirrored, multiworker"),
    "--seed": ("seed", "random seed"),
}
TRAINING_SECTIONS = ("teacher",)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; ``--help`` lists every config key too."""
    parser = argparse.ArgumentParser(
        prog="python -m tfkd.train",
        description="Train a reconstruction-augmented teacher (and, as the pipeline grows, "
                    "distill a student and export it). With no arguments: the whole pipeline "
                    "on the bundled digits dataset.",
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


def _update_metrics(run_dir: Path, stage: str, metrics: dict[str, Any]) -> None:
    from tfkd import io

    path = run_dir / "metrics.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    stages = previous.get("stages", {})
    stages[stage] = metrics
    io.write_json(path, {"stage": stage, **metrics, "stages": stages})


def _learning_rate(opt: config_lib.OptimizerConfig, batch_size: int, total_steps: int) -> Any:
    import keras

    lr = opt.learning_rate * batch_size / 128
    if opt.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(total_steps, 1))
    return lr


def train_teacher(cfg: config_lib.RunConfig, data: Any, strategy: Any, out_dir: Path,
                  chief: bool) -> dict[str, Any]:
    """Trains the reconstruction-augmented teacher; returns its metrics."""
    import keras

    from tfkd import callbacks, io, models
    from tfkd.teacher import ReconstructionTeacher

    tcfg, batch = cfg.teacher, cfg.data.batch_size
    train_ds = data.train_dataset(batch, cfg.seed, cfg.data.augment, cfg.data.shuffle_buffer)
    val_ds = data.eval_dataset("val", batch) if len(data.val_labels) else None
    steps = len(data.train_labels) // batch
    with strategy.scope():
        backbone = models.get(tcfg.model, data.num_classes, data.image_shape, cfg.sync_batchnorm)
        teacher = ReconstructionTeacher(backbone, lambda_cls=tcfg.lambda_cls,
                                        lambda_rec=tcfg.lambda_rec, pixel_mean=data.mean.tolist(),
                                        pixel_std=data.std.tolist(), name="teacher")
        opt = tcfg.optimizer
        optimizer = keras.optimizers.SGD(_learning_rate(opt, batch, steps * tcfg.epochs),
                                         momentum=opt.momentum, nesterov=True,
                                         weight_decay=opt.weight_decay or None)
        teacher.compile(optimizer=optimizer)
        teacher(data.normalize(data.train_images[:2]))  # build, so a backup can be restored
        optimizer.build(teacher.trainable_variables)
    meter = callbacks.ThroughputMeter(batch)
    sample = data.test_images[np.linspace(0, len(data.test_images) - 1, 10).astype(int)]
    cbs = [
        keras.callbacks.BackupAndRestore(str(out_dir / "backup" / "teacher"), double_checkpoint=True),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.CSVLogger(str(out_dir / "teacher_log.csv"), append=True),
        keras.callbacks.TensorBoard(str(out_dir / "tensorboard" / "teacher"), profile_batch=0),
        meter,
        callbacks.ReconstructionPlot(sample, data.mean, data.std, out_dir / "reconstructions.png"),
    ]
    verbose = cfg.verbose if cfg.verbose is not None else (1 if sys.stdout.isatty() else 2)
    start = time.perf_counter()
    history = teacher.fit(train_ds, validation_data=val_ds, epochs=tcfg.epochs, callbacks=cbs,
                          verbose=verbose, shuffle=False)  # the dataset shuffles itself
    fit_seconds = time.perf_counter() - start
    _remove_if_empty(out_dir / "backup")
    _check_finite(history.history, "teacher")
    test = teacher.evaluate(data.eval_dataset("test", batch), verbose=0, return_dict=True)
    val = teacher.evaluate(val_ds, verbose=0, return_dict=True) if val_ds is not None else {}
    if chief:
        with io.atomic_path(out_dir / "teacher.keras") as tmp:
            teacher.save(tmp)
    return {
        "model": tcfg.model, "lambda_cls": tcfg.lambda_cls, "lambda_rec": tcfg.lambda_rec,
        "epochs": tcfg.epochs, "epochs_run_here": len(history.history.get("loss", [])),
        "val_accuracy": val.get("accuracy"), "val_psnr": val.get("psnr"),
        "test_accuracy": test["accuracy"], "test_psnr": test["psnr"], "test_loss": test["loss"],
        "params": int(backbone.count_params()),
        "train_images_per_second": meter.images_per_second,
        "wall_seconds": fit_seconds,
    }


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


def run(cfg: config_lib.RunConfig) -> dict[str, Any]:
    """Runs the configured stage(s); returns the metrics of the last stage run."""
    from tfkd.strategy import is_chief, make_strategy

    strategy = make_strategy(cfg.strategy)  # first: multi-worker must start before other ops
    import keras

    from tfkd import data as data_lib
    from tfkd import io

    keras.utils.set_random_seed(cfg.seed)
    chief = is_chief(strategy)
    run_dir = Path(cfg.run_dir)
    data = data_lib.prepare(cfg.data.dataset, cfg.data.data_dir, cfg.data.image_size,
                            cfg.data.validation_fraction, cfg.seed, cfg.data.hflip)
    out_dir = run_dir if chief else Path(tempfile.mkdtemp(prefix="tfkd-worker-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if chief:
        io.write_text(run_dir / "config.yaml", config_lib.to_yaml(cfg))
        io.write_json(run_dir / "dataset.json", data.info())
    metrics: dict[str, Any] = {}
    if cfg.stage in ("teacher", "all"):
        if (run_dir / "teacher.keras").is_file():
            print(f"tfkd: {run_dir / 'teacher.keras'} exists: skipping the teacher stage "
                  "(remove it, or choose another --run-dir, to train again)")
            metrics = json.loads((run_dir / "metrics.json").read_text())["stages"]["teacher"] \
                if (run_dir / "metrics.json").is_file() else {}
        else:
            metrics = train_teacher(cfg, data, strategy, out_dir, chief)
            if chief:
                _update_metrics(run_dir, "teacher", metrics)
    return metrics


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
