"""``python -m tfkd.bench``: benchmarks that print their figures.

``pipeline``: images per second of the input pipeline alone next to the teacher's training
step on the same data, and their ratio (the pipeline must not be what limits training).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence


def _pipeline_rate(dataset: Any, batches: int) -> float:
    iterator = iter(dataset)
    next(iterator)  # warm-up: builds the pipeline and fills the prefetch buffer
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += int(next(iterator)[1].shape[0])
    return images / (time.perf_counter() - start)


def _train_step_rate(cfg: Any, data: Any, steps: int) -> float:
    import keras

    from tfkd import models
    from tfkd.teacher import ReconstructionTeacher

    teacher = ReconstructionTeacher(models.get(cfg.model, data.num_classes, data.image_shape),
                                    pixel_mean=data.mean.tolist(), pixel_std=data.std.tolist())
    teacher.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True))
    # a fixed in-memory batch repeated: measures the step, not the pipeline
    x, y = next(iter(data.train_dataset(cfg.batch_size)))
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    teacher.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # trace
    start = time.perf_counter()
    teacher.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps * cfg.batch_size / (time.perf_counter() - start)


def pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """Measures the input pipeline against the teacher's train step."""
    from tfkd import data as data_lib

    data = data_lib.prepare(args.dataset, args.data_dir, validation_fraction=0.1)
    pipe = _pipeline_rate(data.train_dataset(args.batch_size), args.batches)
    step = _train_step_rate(args, data, args.steps)
    result = {"dataset": args.dataset, "model": args.model, "batch_size": args.batch_size,
              "pipeline_images_per_second": round(pipe, 1),
              "train_step_images_per_second": round(step, 1),
              "pipeline_over_step": round(pipe / step, 2), "cpu_count": os.cpu_count()}
    print(json.dumps(result, indent=2))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(prog="python -m tfkd.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pipeline", help="input pipeline vs teacher train step, images/s")
    p.add_argument("--dataset", default="digits", help="dataset name (as for tfkd.train)")
    p.add_argument("--data-dir", default=os.environ.get("TFKD_CIFAR10_DIR"),
                   help="CIFAR python batches folder (default: $TFKD_CIFAR10_DIR)")
    p.add_argument("--model", default="resnet20", help="teacher backbone")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=200, help="pipeline batches to time")
    p.add_argument("--steps", type=int, default=20, help="train steps to time")
    args = parser.parse_args(argv)
    from tfkd.errors import TfkdError

    try:
        {"pipeline": pipeline}[args.command](args)
    except TfkdError as error:
        print(f"tfkd: error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
