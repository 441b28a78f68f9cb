#!/usr/bin/env python3
"""Benchmark exported tfkd models in ONNX Runtime and LiteRT, no TensorFlow needed.

    python benchmark.py artifacts/s1                    # every .onnx and .tflite file there
    python benchmark.py model.onnx model_int8.tflite --threads 2 --runs 200
    python benchmark.py artifacts/s1 --no-xnnpack       # LiteRT's own kernels, no XNNPACK

For each model: batch-1 latency (p50, p90, p99 over --runs calls after --warmup calls) and
throughput in images/s at each of --batch-sizes. Writes benchmark.json and benchmark.png (a bar
chart; needs matplotlib) into --out (default: the first input's folder).
Exit codes: 0 done, 2 bad arguments, 3 bad input, 4 bad model.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from runtimes import MODEL_SUFFIXES, EdgeModel, KitError, KitParser, count


def find_models(inputs: list[str]) -> list[Path]:
    models = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            models += sorted(p for p in path.iterdir() if p.suffix in MODEL_SUFFIXES)
        elif path.is_file():
            models.append(path)
        else:
            raise KitError(f"{path}: not found")
    if not models:
        raise KitError(f"no .onnx or .tflite model in {', '.join(inputs)}")
    return models


def measure(model: EdgeModel, batch_sizes: list[int], warmup: int, runs: int) -> dict:
    height, width = model.image_size
    rng = np.random.default_rng(0)
    result: dict = {"file": model.path.name, "runtime": model.runtime, "bytes": model.path.stat().st_size}
    one = rng.uniform(0, 255, (1, height, width, 3)).astype(np.float32)
    for _ in range(warmup):
        model.logits(one)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model.logits(one)
        times.append((time.perf_counter() - start) * 1000)
    result["batch1_ms"] = {f"p{q}": float(np.percentile(times, q)) for q in (50, 90, 99)}
    result["images_per_second"] = {}
    for size in batch_sizes:
        batch = rng.uniform(0, 255, (size, height, width, 3)).astype(np.float32)
        for _ in range(max(1, warmup // 2)):
            model.logits(batch)
        repeats = max(3, runs // size)
        start = time.perf_counter()
        for _ in range(repeats):
            model.logits(batch)
        result["images_per_second"][str(size)] = size * repeats / (time.perf_counter() - start)
    return result


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [r["file"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.5 * len(names) + 2))
    left.barh(names, [r["batch1_ms"]["p50"] for r in results], color="tab:blue")
    left.set_xlabel("batch-1 latency p50 (ms)")
    largest = max(results[0]["images_per_second"], key=int)
    right.barh(names, [r["images_per_second"][largest] for r in results], color="tab:green")
    right.set_xlabel(f"throughput at batch {largest} (images/s)")
    right.set_yticks([])
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = KitParser(prog="benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help="model files or folders of them")
    parser.add_argument("--threads", type=count(0), default=0, help="runtime threads (default: runtime's)")
    parser.add_argument("--warmup", type=count(0), default=10)
    parser.add_argument("--runs", type=count(1), default=100)
    parser.add_argument("--image-size", type=count(1),
                        help="side in pixels, for a model that takes any image size")
    parser.add_argument("--batch-sizes", default="8,32", help="comma-separated (default 8,32)")
    parser.add_argument("--no-xnnpack", action="store_true",
                        help="LiteRT without its default XNNPACK delegate (its own kernels only)")
    parser.add_argument("--out", help="folder for benchmark.json and benchmark.png")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.batch_sizes.split(",") if s]
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        print(f"benchmark: error: --batch-sizes {args.batch_sizes!r}: expected positive integers", file=sys.stderr)
        return 2
    try:
        paths = find_models(args.inputs)
        results = []
        for path in paths:
            results.append(measure(EdgeModel(path, args.threads, args.image_size, not args.no_xnnpack),
                                   sizes, args.warmup, args.runs))
            r = results[-1]
            print(f"{r['file']:24s} {r['runtime']:12s} batch-1 p50 {r['batch1_ms']['p50']:8.3f} ms  "
                  f"p90 {r['batch1_ms']['p90']:8.3f}  p99 {r['batch1_ms']['p99']:8.3f}  " +
                  "  ".join(f"b{k}: {v:9.1f} img/s" for k, v in r["images_per_second"].items()))
    except KitError as error:
        print(f"benchmark: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("benchmark: interrupted", file=sys.stderr)
        return 130
    out = Path(args.out) if args.out else (paths[0].parent)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(13, "not writable", str(out))
    except OSError as error:
        print(f"benchmark: error: {out}: cannot write the report ({error.strerror})", file=sys.stderr)
        return 2
    report = {"machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(),
                          "python": platform.python_version()},
              "threads": args.threads, "warmup": args.warmup, "runs": args.runs,
              "xnnpack": not args.no_xnnpack, "models": results}
    tmp = out / f".tmp-{os.getpid()}-benchmark.json"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "benchmark.json")
    drew = plot(results, out / "benchmark.png")
    print(f"wrote {out / 'benchmark.json'}" + (f" and {out / 'benchmark.png'}" if drew else
                                                 " (install matplotlib for benchmark.png)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
