"""``python -m tfkd.import_pytorch``: a PyTorch CIFAR ResNet checkpoint as a tfkd teacher.

Reads a state dict (``.npz``, or an original legacy ``.th``/``.pt`` checkpoint read without
running any code in it), builds the zoo's ``resnet{depth}a`` with those weights and the
normalization they were trained with in front (so the model takes [0, 255] pixels), and saves it
as ``.keras`` with a record beside it (``<name>.json``: classes, input, source, and with
``--dataset`` its measured test accuracy), which ``tfkd.train --teacher`` checks against the run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from tfkd import cli


def build_parser() -> Any:
    """The command-line interface."""
    parser = cli.Parser(prog="python -m tfkd.import_pytorch", description=__doc__.split("\n\n")[0],
                        epilog="Exit codes: 0 done, 2 bad option (or --out exists), 3 bad data, 4 bad "
                               "checkpoint.")
    parser.add_argument("checkpoint", help="a .npz state dict, or a legacy PyTorch .th/.pt checkpoint")
    parser.add_argument("--out", required=True, help="the .keras file to write (must not exist)")
    parser.add_argument("--mean", type=float, nargs=3, default=None, metavar="M",
                        help="per-channel mean of [0, 1] pixels the weights were trained with "
                             "(default: ImageNet's 0.485 0.456 0.406)")
    parser.add_argument("--std", type=float, nargs=3, default=None, metavar="S",
                        help="per-channel std likewise (default: ImageNet's 0.229 0.224 0.225)")
    parser.add_argument("--dataset", help="also measure top-1 on this dataset's test split and record "
                                          "its class names (e.g. cifar10)")
    parser.add_argument("--data-dir", help="the dataset's folder (CIFAR python batches)")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's own log")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    from tfkd.errors import ConfigError

    def body() -> int:
        args = build_parser().parse_args(argv)
        out = Path(args.out)
        if out.suffix != ".keras":
            raise ConfigError(f"--out {out}: expected a .keras file name")
        from tfkd import io

        if out.exists() or io.model_record_path(out).exists():
            raise ConfigError(f"--out {out}: exists; tfkd never overwrites it (choose another name)")
        if any(s <= 0 for s in args.std or [1.0]):
            raise ConfigError(f"--std {args.std}: expected positive numbers")
        cli.import_tensorflow(args.verbose)
        import numpy as np

        from tfkd import rundir
        from tfkd.models import pytorch

        state = pytorch.read_state_dict(args.checkpoint)
        model = pytorch.import_cifar_resnet(state, args.mean or pytorch.IMAGENET_MEAN,
                                            args.std or pytorch.IMAGENET_STD)
        record: dict[str, Any] = {
            "model": model.name, "input": "pixels in [0, 255] (normalization inside)",
            "normalization": {"mean": list(args.mean or pytorch.IMAGENET_MEAN),
                              "std": list(args.std or pytorch.IMAGENET_STD), "of": "[0, 1] pixels"},
            "classes": int(model.output["logits"].shape[-1]), "params": int(model.count_params()),
            "source": str(args.checkpoint), "source_sha256": rundir.sha256(args.checkpoint)}
        if args.dataset:
            from tfkd import data as data_lib

            source = data_lib.load_source(args.dataset, args.data_dir)
            if len(source.class_names) != record["classes"]:
                raise ConfigError(f"--dataset {args.dataset}: {len(source.class_names)} classes, the "
                                  f"checkpoint has {record['classes']}")
            logits = model.predict(source.test_images.astype(np.float32), batch_size=500, verbose=0)["logits"]
            record.update({"class_names": source.class_names, "dataset": args.dataset,
                           "test_images": int(len(source.test_labels)),
                           "test_accuracy": float(np.mean(logits.argmax(1) == source.test_labels))})
        with io.atomic_path(out) as tmp:
            model.save(tmp)
        io.write_json(io.model_record_path(out), record)
        shown = f", test top-1 {record['test_accuracy']:.2%} on {record['test_images']} images" \
            if "test_accuracy" in record else ""
        print(f"tfkd: imported {model.name} ({record['params']:,} parameters{shown}) to {out}")
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
