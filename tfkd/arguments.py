"""The ``python -m tfkd.train`` command line: its flags, and how they become a ``RunConfig``.

Shared by the command itself and by ``tfkd.bench``, whose protocol runner resolves each job's
arguments exactly as the job will. Parsing imports nothing heavy.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from tfkd import cli
from tfkd import config as config_lib

#: Dedicated flags: flag -> (config key, help). Everything else goes through --set.
FLAGS = {
    "--stage": ("stage", "what to run: teacher, distill, export, or all (default)"),
    "--method": ("distill.method", "a registered method (cft by default; python -m tfkd.train --help "
                                   "lists them under distill.method) or a composition like cft+dkd, kd+ls"),
    "--teacher": ("distill.teachers", "a trained teacher (.keras file or run folder); give it "
                                      "twice for mktn: the reconstruction teacher, then the "
                                      "classifier"),
    "--student-model": ("student.model", "student backbone: a zoo model, keras:NAME or keras_hub:PRESET"),
    "--dataset": ("data.dataset", "cifar10, cifar100, digits (offline default), folder:PATH or tfds:NAME"),
    "--data-dir": ("data.data_dir", "folder holding the canonical CIFAR python batches (without it "
                                    "CIFAR comes from TensorFlow Datasets), or tfds:NAME's data folder"),
    "--teacher-model": ("teacher.model", "teacher backbone: a zoo model, keras:NAME or keras_hub:PRESET"),
    "--epochs": ("epochs", "training epochs of every stage that trains"),
    "--batch-size": ("data.batch_size", "global batch size"),
    "--run-dir": ("run_dir", "output folder; re-running the same command resumes there"),
    "--recipe": ("recipe", "a named training recipe (mdistiller-cifar100: the field's CIFAR-100 "
                           "schedule and per-pair settings); the config file, --set and the other "
                           "flags win over it"),
    "--strategy": ("strategy", "tf.distribute strategy: auto, default, mirrored, multiworker"),
    "--seed": ("seed", "random seed"),
    "--deterministic": ("deterministic", "deterministic ops: two runs with the same --seed write "
                                         "identical metrics (slower)"),
}
TRAINING_SECTIONS = ("teacher", "student")
EXIT_CODES = ("Exit codes: 0 done, 2 bad option or config (or the run folder is in use or holds "
              "other settings), 3 bad data, 4 bad model file, 5 training failed, 130 interrupted.")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; ``--help`` lists every config key too."""
    parser = cli.Parser(
        prog="python -m tfkd.train",
        description="Train a reconstruction-augmented teacher, then distill a student from it "
                    "with the chosen method. With no arguments: the whole pipeline (cft) on the "
                    "bundled digits dataset.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every option below can be set in the --config YAML file (nested sections) or "
               "with --set KEY=VALUE;\nthe dedicated flags above win over both.\n\n"
               + config_lib.describe_options() + "\n\n" + EXIT_CODES)
    parser.add_argument("--config", metavar="YAML", help="YAML file of options (see below)")
    for flag, (_, help_text) in FLAGS.items():
        kwargs: dict[str, Any] = {"help": help_text}
        if flag in ("--epochs", "--batch-size", "--seed"):
            kwargs["type"] = int  # ranges are checked with the config, naming the key
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
    parser.add_argument("--retrain", action="store_true",
                        help="train again a stage whose artifact exists with other settings "
                             "(without it such a re-run is refused, naming the settings)")
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's own start-up and C++ log (also: TFKD_LOG_LEVEL=info)")
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


def config_from_argv(argv: Sequence[str]) -> config_lib.RunConfig:
    """The configuration ``python -m tfkd.train ARGV`` would run with."""
    return config_from_args(build_parser().parse_args(list(argv)))
