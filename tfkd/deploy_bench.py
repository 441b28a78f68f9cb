"""``python -m tfkd.bench deploy``: phone students trained to be real models, then exported
every way, quantization-aware fine-tuned, timed on this CPU and counted op by op.

Four steps, each cached in ``OUT`` and resumed when the command is run again:

1. **train** the protocol's teachers and students (``tfkd.protocol``: ``OUT/runs/``; its
   accuracy report as ``OUT/training.json``/``.md``/``.png``);
2. **export** every student with ``tfkd.export`` (every format, the accuracy budget
   ``--max-drop`` on the validation split) into ``OUT/exports/<run>/``;
3. **QAT**: ``tfkd.compress --method qat`` of each student distilled from a teacher, with KD
   against that teacher, into ``OUT/qat/<run>/``;
4. **time** every file with the ``export/`` kit's ``benchmark.py`` at batch 1 on one thread
   (the same setting for both runtimes), LiteRT with and without XNNPACK.

Then ``OUT/results.json`` (per student and format: ``fp32_top1``, ``top1``, ``drop_pt``,
``latency_ms``, ``int_ops``, ``float_ops`` and more), ``results.md`` (a table per student) and
``results.png`` (test top-1 against latency, one panel per student). Each step is its own
process, like the protocol's runs, so a kill loses at most the step it interrupted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from tfkd.errors import TrainingError

KIT = Path(__file__).resolve().parents[1] / "export"


def _run(command: list[str], what: str, log: Path) -> None:
    """Runs ``command`` (a Python module or script) with its output appended to ``log``."""
    print(f"tfkd.bench: {what}: {' '.join(command)} (output: {log})", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as stream:
        status = subprocess.run([sys.executable, *command], stdout=stream, stderr=subprocess.STDOUT).returncode
    if status < 0:
        raise KeyboardInterrupt
    if status != 0:
        raise TrainingError(f"{what} failed with exit code {status}; see {log}; re-run the same "
                            "command to continue")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def folder_name(entry: str) -> str:
    """A report entry (``keras:MobileNetV3Small/cft``) as one folder name."""
    return entry.replace("/", "__").replace(":", "_")


def export_step(job: Any, out: Path, args: Any) -> dict[str, Any]:
    """The student of ``job`` exported every way (cached: a finished export with this budget)."""
    target = out / "exports" / folder_name(job.name)
    card = _read(target / "model_card.json")
    if card is None or card.get("max_drop_pt") != args.max_drop:
        _run(["-m", "tfkd.export", str(job.run_dir), "--out", str(target), "--max-drop", str(args.max_drop),
              "--latency-runs", str(args.latency_runs), "--max-test-images", str(args.max_test_images),
              *(["--formats", args.formats] if args.formats else [])],
             f"export {job.name}", out / "logs" / f"export-{target.name}.log")
        card = _read(target / "model_card.json")
    return card or {}


def qat_step(job: Any, teacher: Path, out: Path, args: Any) -> dict[str, Any]:
    """QAT of ``job``'s student with KD against ``teacher`` (cached: a finished report)."""
    target = out / "qat" / folder_name(job.name)
    report = _read(target / "compress_report.json")
    if report is None or report.get("epochs") != args.qat_epochs:
        _run(["-m", "tfkd.compress", str(job.run_dir), "--out", str(target), "--method", "qat",
              "--teacher", str(teacher), "--epochs", str(args.qat_epochs), "--max-drop", str(args.max_drop),
              "--max-test-images", str(args.max_test_images)],
             f"qat {job.name}", out / "logs" / f"qat-{target.name}.log")
        report = _read(target / "compress_report.json")
    return report or {}


def time_step(folder: Path, runs: int, xnnpack: bool) -> dict[str, dict[str, Any]]:
    """Batch-1 p50 latency (ms, one thread) of every model file in ``folder`` with the kit's
    benchmark (cached in ``folder/timing[-no-xnnpack]/benchmark.json``)."""
    target = folder / ("timing" if xnnpack else "timing-no-xnnpack")
    report = _read(target / "benchmark.json")
    if report is None or report.get("runs") != runs:
        _run([str(KIT / "benchmark.py"), str(folder), "--threads", "1", "--runs", str(runs),
              "--warmup", "20", "--batch-sizes", "1", "--out", str(target),
              *([] if xnnpack else ["--no-xnnpack"])], f"timing {folder.name}",
             folder.parent.parent / "logs" / f"timing-{folder.parent.name}-{folder.name}.log")
        report = _read(target / "benchmark.json")
    return {m["file"]: m for m in (report or {}).get("models", [])}


def rows_of(card: dict[str, Any], timing: dict[str, Any], reference_timing: dict[str, Any]) -> dict[str, Any]:
    """Per format of an export: the figures the report shows."""
    rows = {}
    fp32_top1 = card["keras"]["top1"]
    for fmt, entry in card["formats"].items():
        if fmt == "saved_model":
            continue
        ops = entry.get("ops") or {}
        record = entry.get("budget") or {}
        xnn = ops.get("xnnpack") or {}
        rows[fmt] = {
            "file": entry["file"], "bytes": entry["bytes"], "io": entry.get("io"),
            "fp32_top1": fp32_top1, "top1": entry["top1"], "drop_pt": (fp32_top1 - entry["top1"]) * 100,
            "val_drop_pt": record.get("drop_pt"), "within_budget": record.get("within_budget"),
            "float_tensors_kept": len(record.get("kept_float", [])), "float_ops_kept": len(record.get("float_ops", [])),
            "latency_ms": (timing.get(entry["file"]) or {}).get("batch1_ms", {}).get("p50"),
            "latency_ms_no_xnnpack": None if entry["file"].endswith(".onnx") else
            (reference_timing.get(entry["file"]) or {}).get("batch1_ms", {}).get("p50"),
            "int_ops": ops.get("int_ops"), "hybrid_ops": ops.get("hybrid_ops"), "float_ops": ops.get("float_ops"),
            "conversions": ops.get("conversions"), "float_kinds": ops.get("float_kinds"),
            "xnnpack_partitions": xnn.get("partitions"), "xnnpack_ops": xnn.get("delegated_ops"),
            "not_delegated": xnn.get("not_delegated"),
        }
    return rows


def qat_row(report: dict[str, Any], folder: Path, timing: dict[str, Any], reference_timing: dict[str, Any],
            fp32_top1: float) -> dict[str, Any]:
    """The QAT file's figures (as ``rows_of``)."""
    from tfkd import opcount

    entry = report["compressed_int8"]
    ops = opcount.count(folder / entry["file"])
    xnn = ops.get("xnnpack") or {}
    return {
        "file": f"qat/{entry['file']}", "bytes": entry["bytes"], "fp32_top1": fp32_top1,
        "top1": entry["top1"], "drop_pt": (fp32_top1 - entry["top1"]) * 100,
        "val_drop_pt": report.get("val_drop_pt"), "within_budget": report.get("within_budget"),
        "post_training_top1": report["post_training_int8"]["top1"], "epochs": report.get("epochs"),
        "latency_ms": (timing.get(entry["file"]) or {}).get("batch1_ms", {}).get("p50"),
        "latency_ms_no_xnnpack": (reference_timing.get(entry["file"]) or {}).get("batch1_ms", {}).get("p50"),
        "int_ops": ops["int_ops"], "hybrid_ops": ops["hybrid_ops"], "float_ops": ops["float_ops"],
        "conversions": ops["conversions"], "float_kinds": ops["float_kinds"],
        "xnnpack_partitions": xnn.get("partitions"), "xnnpack_ops": xnn.get("delegated_ops"),
        "not_delegated": xnn.get("not_delegated"),
    }


def run(args: Any) -> dict[str, Any]:
    """Runs (or continues) the four steps and writes the report."""
    import shlex

    from tfkd import io
    from tfkd import protocol as protocol_lib

    protocol = protocol_lib.load(args.protocol)
    out = Path(args.out or Path("benchmarks") / "results" / "deploy")
    job_list = protocol_lib.jobs(protocol, out, args.data_dir, args.epochs, None, args.only, args.set, False,
                                 args.teachers_dir)
    command = "python -m tfkd.bench " + shlex.join(protocol_lib.portable(args.argv))
    training = protocol_lib.run_protocol(protocol, out, job_list, command, name="training")
    students: dict[str, Any] = {}
    for job in (j for j in job_list if j.kind == "student"):
        card = export_step(job, out, args)
        folder = out / "exports" / folder_name(job.name)
        timing, reference = time_step(folder, args.timing_runs, True), time_step(folder, args.timing_runs, False)
        rows = rows_of(card, timing, reference)
        teachers = protocol.teachers_of(protocol.runs[job.run], job.student)
        if teachers and args.qat_epochs:
            report = qat_step(job, protocol_lib.teacher_file(out, teachers[0]), out, args)
            qat_folder = out / "qat" / folder_name(job.name)
            rows["qat_int8"] = qat_row(report, qat_folder, time_step(qat_folder, args.timing_runs, True),
                                       time_step(qat_folder, args.timing_runs, False), card["keras"]["top1"])
        run_result = training["runs"].get(job.name, {})
        students[job.name] = {
            "student": job.student, "method": protocol.runs[job.run].method,
            "val_top1": run_result.get("val", {}).get("mean"), "test_top1": run_result.get("test", {}).get("mean"),
            "fp32_top1": card["keras"]["top1"], "fp32_val_top1": card["keras"].get("val_top1"),
            "keras_latency_ms": card["keras"]["batch1_latency_ms"], "warnings": card.get("warnings", []),
            "formats": rows,
            "training_seconds": sum((s.get("epochs_seconds") or 0) for s in run_result.get("seeds", {}).values()),
        }
    results = {"protocol": protocol.name, "description": protocol.description, "epochs": training["epochs"],
               "max_drop_pt": args.max_drop, "qat_epochs": args.qat_epochs, "timing": {
                   "threads": 1, "runs": args.timing_runs, "batch": 1,
                   "tool": "export/benchmark.py (LiteRT with and without XNNPACK, ONNX Runtime's CPU provider)"},
               "teachers": training["teachers"], "students": students,
               "run_seconds": training.get("run_seconds"), **protocol_lib.provenance(command)}
    io.write_json(out / "results.json", results)
    io.write_text(out / "results.md", markdown(results))
    plot(results, out / "results.png")
    print(markdown(results))
    print(f"tfkd.bench: wrote {out / 'results.json'}, results.md, results.png")
    return results


#: Options whose values are this machine's folders: the report names them as placeholders.
def _cell(value: Any, fmt: str = "{:.2f}") -> str:
    return "—" if value is None else fmt.format(value)


def markdown(results: dict[str, Any]) -> str:
    """One table per student: every format's accuracy, drop, size, latency and op counts."""
    lines = [f"# {results['protocol']}: deployment", "", results.get("description", "").strip(), "",
             f"Students trained {results['epochs']} epochs. Drops are fp32 (the Keras student) minus "
             f"the file, in points of top-1; the budget ({results['max_drop_pt']:g} pt) is checked on "
             "the validation split, the other figures are the test split. Latency: batch-1 p50, one "
             "thread, this CPU. Ops: integer (+ hybrid) / float, conversions not counted; XNNPACK: "
             "the ops its delegate took, in how many partitions.", ""]
    for name, student in results["students"].items():
        lines += [f"## {name}", "",
                  f"fp32 (Keras): test {student['fp32_top1'] * 100:.2f}%, validation "
                  f"{_cell((student.get('fp32_val_top1') or 0) * 100)}%", ""]
        for warning in student.get("warnings", []):
            lines += [f"> WARNING: {warning}", ""]
        lines += ["| format | test top-1 % | drop (pt) | val drop (pt) | budget | size (KiB) | latency ms | "
                  "latency ms, no XNNPACK | int / float ops | XNNPACK ops (partitions) | not delegated |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for fmt, row in student["formats"].items():
            budget = "—" if row.get("within_budget") is None else ("within" if row["within_budget"] else "MISSED")
            if row.get("float_tensors_kept"):
                budget += f" ({row['float_ops_kept']} ops float)"
            hybrid = f"+{row['hybrid_ops']}h" if row.get("hybrid_ops") else ""
            xnn = "—" if row.get("xnnpack_ops") is None else f"{row['xnnpack_ops']} ({row['xnnpack_partitions']})"
            left = ", ".join(f"{k} x{v}" for k, v in (row.get("not_delegated") or {}).items()) or "—"
            lines.append(f"| {fmt} | {row['top1'] * 100:.2f} | {row['drop_pt']:+.2f} | {_cell(row.get('val_drop_pt'), '{:+.2f}')} | "
                         f"{budget} | {row['bytes'] / 1024:.0f} | {_cell(row.get('latency_ms'), '{:.3f}')} | "
                         f"{_cell(row.get('latency_ms_no_xnnpack'), '{:.3f}')} | "
                         f"{_cell(row.get('int_ops'), '{}')}{hybrid} / {_cell(row.get('float_ops'), '{}')} | {xnn} | {left} |")
        lines.append("")
    lines += [f"Command: `{results['command']}`  ", f"Commit: `{results['git_commit']}`, date {results['date']}  ",
              f"Machine: {results['machine']['cpu_count']} cores, {results['machine']['cpu_model']}, "
              f"Python {results['machine']['python']}", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Test top-1 against batch-1 latency, one panel per student, every format a labelled point."""
    from matplotlib.figure import Figure

    from tfkd import io

    students = list(results["students"].items())
    if not students:
        return
    fig = Figure(figsize=(5.5 * len(students), 4.5))
    axes = fig.subplots(1, len(students), squeeze=False)[0]
    for ax, (name, student) in zip(axes, students):
        for fmt, row in student["formats"].items():
            if row.get("latency_ms") is None:
                continue
            runtime = "onnx" in fmt
            ax.scatter(row["latency_ms"], row["top1"] * 100, marker="s" if runtime else "o",
                       color="tab:orange" if runtime else ("tab:green" if fmt == "qat_int8" else "tab:blue"))
            ax.annotate(fmt, (row["latency_ms"], row["top1"] * 100), fontsize=7, xytext=(3, 2),
                        textcoords="offset points")
        ax.axhline(student["fp32_top1"] * 100, color="gray", linestyle="--", linewidth=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("batch-1 latency p50, 1 thread (ms)")
        ax.set_ylabel("test top-1 (%)")
    fig.suptitle(f"{results['protocol']}: accuracy vs latency (circles LiteRT, squares ONNX Runtime; "
                 "dashed: fp32)", fontsize=9)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
