"""``python -m tfkd.train``: parse and validate the options, then run the pipeline.

Options are checked before TensorFlow is imported, so a bad one fails at once with one line;
the stages themselves (teacher, distill, export) are ``tfkd.pipeline``'s.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from tfkd import cli
from tfkd.arguments import build_parser, config_from_args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = build_parser()

    def body() -> int:
        args = parser.parse_args(argv)
        cfg = config_from_args(args)
        if args.print_config:
            from tfkd import config as config_lib

            print(config_lib.to_yaml(cfg), end="")
            return 0
        from tfkd import pipeline

        metrics = pipeline.run(cfg, retrain=args.retrain, verbose=args.verbose)
        summary = {k: v for k, v in metrics.items() if k in ("val_accuracy", "test_accuracy", "test_psnr")}
        print(f"tfkd: done: {cfg.run_dir} {json.dumps(summary)}")
        for warning in metrics.get("warnings", []):  # last, where a user looks
            print(f"tfkd: WARNING: {warning}", flush=True)
        return 0

    return cli.run(body, interrupted="interrupted; re-run the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
