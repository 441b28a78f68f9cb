"""Accuracy benchmark protocols: data files that say which teachers and students to train.

A protocol (``benchmarks/protocols/<name>.yaml``) names a dataset, an epoch count, seeds, the
teachers (each a ``tfkd.train --stage teacher`` run) and the student runs (a method, the
teachers it learns from, and config overrides for ablations). ``run_protocol`` trains each
teacher once, then every student run for every seed, each as its own ``python -m tfkd.train``
process in ``OUT/runs/``. A run whose ``metrics.json`` already holds its result is not started
again, and an interrupted run resumes from its backup, so an interrupted protocol continues
where it stopped when re-run. ``report`` turns the finished runs into ``results.json``,
``results.md`` (a table) and ``results.png`` (test accuracy with the gain over the student
alone).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence


from tfkd.errors import ConfigError, TrainingError

#: Folder of the protocols shipped with tfkd (``--protocol NAME`` looks here).
PROTOCOL_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "protocols"
PROTOCOL_KEYS = {"description", "dataset", "epochs", "batch_size", "seeds", "student", "set",
                 "teachers", "runs"}
TEACHER_KEYS = {"model", "set"}
RUN_KEYS = {"method", "teachers", "set", "ablation", "description", "seeds"}
BASELINE = "student"


@dataclass
class Teacher:
    """A teacher the protocol trains once (``set`` holds its config overrides)."""

    name: str
    model: str
    set: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """A student run: a method, its teachers (protocol teacher names) and overrides."""

    name: str
    method: str
    teachers: list[str] = field(default_factory=list)
    set: dict[str, Any] = field(default_factory=dict)
    ablation: bool = False
    description: str = ""
    seeds: list[int] | None = None  # None: the protocol's seeds


@dataclass
class Protocol:
    """A parsed protocol file."""

    name: str
    path: Path
    dataset: str
    epochs: int
    batch_size: int
    seeds: list[int]
    student: str
    teachers: dict[str, Teacher]
    runs: dict[str, Run]
    set: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _known(entry: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (expected {', '.join(sorted(allowed))})")


def _seeds(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) for s in value) \
            or len(set(value)) != len(value):
        raise ConfigError(f"{where}: expected a non-empty list of distinct integers, got {value!r}")
    return value


def resolve(protocol: str) -> Path:
    """A protocol file: ``protocol`` itself if it is a file, else a shipped protocol's name."""
    path = Path(protocol)
    if path.is_file():
        return path
    shipped = PROTOCOL_DIR / f"{protocol}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))
    raise ConfigError(f"protocol {protocol!r}: not a file nor a shipped protocol "
                      f"({', '.join(names) or 'none found in ' + str(PROTOCOL_DIR)})")


def load(protocol: str) -> Protocol:
    """Reads and checks a protocol file (YAML, read as data only)."""
    from tfkd.distill.methods import METHODS, teachers_needed

    from tfkd.config import read_yaml_file

    path = resolve(protocol)
    raw = _mapping(read_yaml_file(str(path), "protocol"), str(path))
    _known(raw, PROTOCOL_KEYS, str(path))
    for key in ("dataset", "epochs", "student", "teachers", "runs"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key '{key}'")
    teachers = {}
    for name, entry in _mapping(raw["teachers"], f"{path}: teachers").items():
        entry = _mapping(entry, f"{path}: teachers.{name}")
        _known(entry, TEACHER_KEYS, f"{path}: teachers.{name}")
        if "model" not in entry:
            raise ConfigError(f"{path}: teachers.{name}: missing key 'model'")
        teachers[name] = Teacher(name, entry["model"], _mapping(entry.get("set"), f"{path}: teachers.{name}.set"))
    runs = {}
    for name, entry in _mapping(raw["runs"], f"{path}: runs").items():
        where = f"{path}: runs.{name}"
        entry = _mapping(entry, where)
        _known(entry, RUN_KEYS, where)
        method = entry.get("method")
        if method not in METHODS:
            raise ConfigError(f"{where}: method {method!r}: expected one of {', '.join(METHODS)}")
        run_teachers = list(entry.get("teachers") or [])
        if len(run_teachers) != teachers_needed(method):
            raise ConfigError(f"{where}: method {method} takes {teachers_needed(method)} "
                              f"teacher(s), got {len(run_teachers)}")
        for teacher in run_teachers:
            if teacher not in teachers:
                raise ConfigError(f"{where}: teacher {teacher!r} is not in teachers "
                                  f"({', '.join(teachers)})")
        runs[name] = Run(name, method, run_teachers, _mapping(entry.get("set"), f"{where}.set"),
                         bool(entry.get("ablation", False)), str(entry.get("description", "")),
                         _seeds(entry["seeds"], f"{where}.seeds") if "seeds" in entry else None)
    if BASELINE not in runs:
        raise ConfigError(f"{path}: runs: a run named '{BASELINE}' (the student alone) is needed "
                          "to report gains")
    seeds = _seeds(raw.get("seeds", [0]), f"{path}: seeds")
    epochs = raw["epochs"]
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"{path}: epochs: expected a positive integer, got {epochs!r}")
    return Protocol(path.stem, path, str(raw["dataset"]), epochs, int(raw.get("batch_size", 128)),
                    seeds, str(raw["student"]), teachers, runs, _mapping(raw.get("set"), f"{path}: set"),
                    str(raw.get("description", "")).strip())


#: Config sections that only one kind of run reads: their overrides stay out of the other kind's
#: arguments, so tuning the distillation never invalidates the cached teachers.
ONLY_FOR = {"teacher": "teacher", "student": "student", "distill": "student", "export": None}


def _applies(key: str, kind: str) -> bool:
    section = key.split(".", 1)[0]
    return section not in ONLY_FOR or ONLY_FOR[section] == kind


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _set_flags(overrides: dict[str, Any], kind: str | None = None) -> list[str]:
    flags = []
    for key, value in overrides.items():
        if kind is not None and not _applies(key, kind):
            continue
        flags += ["--set", f"{key}={json.dumps(value) if isinstance(value, (list, bool)) or value is None else value}"]
    return flags


@dataclass
class Job:
    """One ``python -m tfkd.train`` process of the protocol."""

    kind: str  # "teacher" or "student"
    name: str
    seed: int
    run_dir: Path
    args: list[str]

    @property
    def stage(self) -> str:
        """The pipeline stage this job runs (``teacher`` or ``distill``)."""
        return "teacher" if self.kind == "teacher" else "distill"

    def done(self) -> bool:
        """True if the run finished (its metrics.json holds the stage's result).

        Raises ``ConfigError`` if the folder holds a run of other settings (``changed_setting``),
        so a changed protocol, ``--epochs`` or default never reuses stale results.
        """
        changed = self.changed_setting()
        if changed:
            raise ConfigError(f"{self.run_dir}: holds a run with other settings ({changed}, "
                              "e.g. a changed default); remove the folder to redo it")
        return _result(self.run_dir, self.kind) is not None

    def changed_setting(self) -> str | None:
        """The first setting this run reads whose recorded value in the run folder differs from
        what the job's arguments resolve to now; None if all agree. The comparison is
        ``tfkd.rundir``'s, the one ``tfkd.train`` makes on a re-run: each stage's own settings
        only (a kd run does not read the discriminator's options), keys the record lacks
        (options added since) not compared."""
        if not self.run_dir.is_dir():
            return None
        from tfkd import rundir
        from tfkd.arguments import config_from_argv

        cfg = config_from_argv(self.args)
        now = rundir.stage_settings(cfg, self.stage, teachers=cfg.distill.teachers)
        found = rundir.differences(rundir.recorded_settings(self.run_dir, self.stage), now)
        return found[0] if found else None


def _result(run_dir: Path, kind: str) -> dict[str, Any] | None:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    stages = json.loads(path.read_text()).get("stages", {})
    result = stages.get("teacher" if kind == "teacher" else "distill")
    artifact = run_dir / ("teacher.keras" if kind == "teacher" else "student.keras")
    return result if result and artifact.is_file() else None


def jobs(protocol: Protocol, out: Path, data_dir: str | None, epochs: int | None = None,
         seeds: Sequence[int] | None = None, only: Sequence[str] | None = None,
         overrides: Sequence[str] = (), validation_only: bool = False) -> list[Job]:
    """Every process the protocol needs, teachers first, in protocol order.

    Each student run uses ``seeds`` when given, else its own ``seeds`` in the protocol file, else
    the protocol's; teachers are trained once, with the first of ``seeds`` or the protocol's.
    """
    epochs = epochs or protocol.epochs
    teacher_seed = (list(seeds) if seeds else protocol.seeds)[0]
    for name in only or []:
        if name not in protocol.runs:
            raise ConfigError(f"--only {name}: not a run of {protocol.name} "
                              f"({', '.join(protocol.runs)})")
    selected = [protocol.runs[name] for name in (only or protocol.runs)]
    common = ["--dataset", protocol.dataset, "--epochs", str(epochs),
              "--batch-size", str(protocol.batch_size), "--set", "progress=2",
              *(["--data-dir", data_dir] if data_dir else [])]
    extra = {kind: [item for o in overrides if _applies(o.split("=", 1)[0].strip(), kind)
                    for item in ("--set", o)] for kind in ("teacher", "student")}
    tuning = ["--set", "data.evaluate_test=false"] if validation_only else []
    needed = {t for run in selected for t in run.teachers}
    result = []
    for name in (t for t in protocol.teachers if t in needed):  # teachers: first seed only
        teacher = protocol.teachers[name]
        run_dir = out / "runs" / "teachers" / name
        result.append(Job("teacher", name, teacher_seed, run_dir, [
            "--stage", "teacher", "--method", "cft", "--teacher-model", teacher.model,
            "--seed", str(teacher_seed), "--run-dir", str(run_dir), *common,
            *_set_flags(protocol.set, "teacher"), *_set_flags(teacher.set), *extra["teacher"]]))
    for run in selected:
        for seed in list(seeds or run.seeds or protocol.seeds):
            run_dir = out / "runs" / run.name / f"seed{seed}"
            teacher_flags = [item for t in run.teachers
                             for item in ("--teacher", str(out / "runs" / "teachers" / t / "teacher.keras"))]
            result.append(Job("student", run.name, seed, run_dir, [
                "--stage", "distill", "--method", run.method, "--student-model", protocol.student,
                *teacher_flags, "--seed", str(seed), "--run-dir", str(run_dir), *common, *tuning,
                *_set_flags(protocol.set, "student"), *_set_flags(run.set), *extra["student"]]))
    return result


def _launch(job: Job) -> None:
    command = [sys.executable, "-m", "tfkd.train", *job.args]
    print(f"tfkd.bench: {job.kind} {job.name} seed {job.seed}: {' '.join(command[1:])}", flush=True)
    status = subprocess.run(command).returncode
    if status != 0:
        raise TrainingError(f"{job.kind} run {job.name} (seed {job.seed}) failed with exit code "
                            f"{status}; see {job.run_dir}; re-run the same command to continue")


def run_protocol(protocol: Protocol, out: Path, job_list: list[Job], command: str,
                 launch: Callable[[Job], None] = _launch,
                 report_jobs: list[Job] | None = None) -> dict[str, Any]:
    """Runs every unfinished job in turn (finished ones are cached), then writes the report of
    ``report_jobs`` (default: the jobs run; pass the whole protocol's so that running a subset
    with ``--only`` still reports every finished run)."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    pending = [job for job in job_list if not job.done()]
    print(f"tfkd.bench: {protocol.name}: {len(job_list) - len(pending)} of {len(job_list)} runs "
          f"cached in {out / 'runs'}, {len(pending)} to run", flush=True)
    for job in tqdm(pending, desc=protocol.name, unit="run", disable=not pending):
        launch(job)
        if not job.done():
            raise TrainingError(f"{job.kind} run {job.name} (seed {job.seed}) ended without "
                                f"results in {job.run_dir}/metrics.json")
    return report(protocol, out, report_jobs or job_list, command)


def machine() -> dict[str, Any]:
    """The machine a benchmark ran on: core count, CPU model, Python version, platform."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform()}


def git_commit() -> str | None:
    """The checked-out commit of tfkd's repository, or None outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance(command: str) -> dict[str, Any]:
    """What a committed benchmark result records beside its figures: the command that produced
    it, the git commit, the date (UTC) and the machine."""
    return {"command": command, "git_commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine()}


def _summary(values: list[float | None]) -> dict[str, Any]:
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return {"mean": statistics.fmean(present), "std": std, "n": len(present)}


def _finished(job: Job) -> bool:
    """``job.done()``, except that a run folder of other settings counts as unfinished (a report
    leaves it out; only running it refuses it)."""
    try:
        return job.done()
    except ConfigError:
        return False


def report(protocol: Protocol, out: Path, job_list: list[Job], command: str) -> dict[str, Any]:
    """Collects the finished runs into results.json, results.md and results.png in ``out``."""
    from tfkd import io

    teachers, runs = {}, {}
    finished = {id(job): _finished(job) for job in job_list}
    for job in job_list:
        result = (_result(job.run_dir, job.kind) if finished[id(job)] else None) or {}
        if job.kind == "teacher":
            teachers[job.name] = {key: result.get(key) for key in (
                "model", "lambda_cls", "lambda_rec", "val_accuracy", "test_accuracy", "test_psnr",
                "params", "train_images_per_second", "wall_seconds")}
            continue
        entry = runs.setdefault(job.name, {
            "method": protocol.runs[job.name].method, "teachers": protocol.runs[job.name].teachers,
            "set": protocol.runs[job.name].set, "ablation": protocol.runs[job.name].ablation,
            "description": protocol.runs[job.name].description, "seeds": {}})
        entry["seeds"][str(job.seed)] = {"finished": finished[id(job)], **{key: result.get(key) for key in (
            "val_accuracy", "test_accuracy", "train_images_per_second", "wall_seconds")}}
    for entry in runs.values():
        for split in ("val", "test"):
            entry[split] = _summary([s[f"{split}_accuracy"] for s in entry["seeds"].values()])
    base = runs.get(BASELINE, {})
    for entry in runs.values():
        for split in ("val", "test"):
            mean, ref = entry[split]["mean"], base.get(split, {}).get("mean")
            entry[split]["gain_over_student"] = None if mean is None or ref is None else mean - ref
    kd_gain = runs.get("kd", {}).get("test", {}).get("gain_over_student")
    cft_gain = runs.get("cft", {}).get("test", {}).get("gain_over_student")
    results = {
        "protocol": protocol.name, "protocol_file": str(protocol.path),
        "description": protocol.description, "dataset": protocol.dataset,
        "student": protocol.student,
        "epochs": _first_epochs(job_list, protocol), "batch_size": protocol.batch_size,
        "seeds": sorted({job.seed for job in job_list if job.kind == "student"}),
        **provenance(command),
        "complete": all(finished.values()),
        "teachers": teachers, "runs": runs,
        "cft_gain_over_kd_gain": None if not kd_gain or cft_gain is None else cft_gain / kd_gain,
    }
    io.write_json(out / "results.json", results)
    io.write_text(out / "results.md", markdown(results))
    plot(results, out / "results.png")
    return results


def _first_epochs(job_list: list[Job], protocol: Protocol) -> int:
    for job in job_list:
        if "--epochs" in job.args:
            return int(job.args[job.args.index("--epochs") + 1])
    return protocol.epochs


def _pct(value: float | None, std: float | None = None, n: int = 1, signed: bool = False) -> str:
    if value is None:
        return "—"
    text = f"{value * 100:+.2f}" if signed else f"{value * 100:.2f}"
    return text + (f" ± {std * 100:.2f}" if n > 1 and std is not None else "")


def _seeds_cell(seeds: dict[str, dict[str, Any]]) -> str:
    """The seeds a row's figures come from, and those still to run (their figures are missing)."""
    done = [seed for seed, r in seeds.items() if r["finished"]]
    todo = [seed for seed in seeds if seed not in done]
    return (", ".join(done) or "—") + (f" (not finished: {', '.join(todo)})" if done and todo else "")


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: teachers, then one row per student run."""
    machine = results["machine"]
    lines = [f"# {results['protocol']}: {results['dataset']}, student {results['student']}, "
             f"{results['epochs']} epochs, batch {results['batch_size']}, "
             f"seeds {', '.join(map(str, results['seeds']))}", ""]
    if not results["complete"]:
        lines += ["**Incomplete**: some runs have not finished; missing figures show as —.", ""]
    lines += ["| teacher | model | lambda_cls | lambda_rec | val top-1 % | test top-1 % | test PSNR dB |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, t in results["teachers"].items():
        psnr = "—" if t.get("test_psnr") is None or not t.get("lambda_rec") else f"{t['test_psnr']:.2f}"
        weights = ["—" if t.get(k) is None else t[k] for k in ("lambda_cls", "lambda_rec")]
        lines.append(f"| {name} | {t.get('model') or '—'} | {weights[0]} | "
                     f"{weights[1]} | {_pct(t.get('val_accuracy'))} | "
                     f"{_pct(t.get('test_accuracy'))} | {psnr} |")
    lines += ["", "| run | method | teachers | overrides | seeds | val top-1 % | test top-1 % | "
                  "test gain over student (pt) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results["runs"].items():
        overrides = ", ".join(f"{k}={v}" for k, v in r["set"].items()) or "—"
        test = r["test"]
        lines.append(f"| {name}{' (ablation)' if r['ablation'] else ''} | {r['method']} | "
                     f"{', '.join(r['teachers']) or '—'} | {overrides} | {_seeds_cell(r['seeds'])} | "
                     f"{_pct(r['val']['mean'], r['val']['std'], r['val']['n'])} | "
                     f"{_pct(test['mean'], test['std'], test['n'])} | "
                     f"{_pct(test['gain_over_student'], signed=True)} |")
    ratio = results.get("cft_gain_over_kd_gain")
    if any(r["test"]["n"] > 1 for r in results["runs"].values()):
        lines += ["", "With several seeds: mean ± sample standard deviation over them; a gain is "
                      "the difference of the means."]
    lines += ["", f"cft's gain over the student alone / kd's gain: "
                  f"{'—' if ratio is None else f'{ratio:.2f}x'}", "",
              f"Command: `{results['command']}`  ",
              f"Commit: `{results['git_commit']}`, date {results['date']}  ",
              f"Machine: {machine['cpu_count']} cores, {machine['cpu_model']}, "
              f"Python {machine['python']}", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Bar chart of every run's test accuracy, labelled with its gain over the student alone."""
    from matplotlib.figure import Figure  # not pyplot: leaves the user's backend alone

    from tfkd import io

    names = list(results["runs"])
    means = [(results["runs"][n]["test"]["mean"] or 0.0) * 100 for n in names]
    stds = [(results["runs"][n]["test"]["std"] or 0.0) * 100 for n in names]
    fig = Figure(figsize=(max(6.0, 1.0 * len(names) + 2), 4.5))
    ax = fig.subplots()
    colors = ["#999999" if n == BASELINE else ("#8fb3d9" if results["runs"][n]["ablation"] else "#2b6cb0")
              for n in names]
    bars = ax.bar(names, means, color=colors)
    spread = [i for i, n in enumerate(names) if results["runs"][n]["test"]["n"] > 1]
    if spread:  # error bars only where there are seeds to spread over (one seed: no std, no bar)
        ax.errorbar([names[i] for i in spread], [means[i] for i in spread],
                    yerr=[stds[i] for i in spread], fmt="none", ecolor="black", capsize=3)
    for bar, name, std in zip(bars, names, stds):
        gain = results["runs"][name]["test"]["gain_over_student"]
        label = "—" if results["runs"][name]["test"]["mean"] is None else (
            "alone" if name == BASELINE else "no student yet" if gain is None else f"{gain * 100:+.2f}")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height() + std),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    present = [m for m in means if m > 0]
    if present:
        ax.set_ylim(max(0.0, min(present) - 5), min(100.0, max(present) + 3))
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{results['protocol']}: {results['student']} student, {results['epochs']} epochs "
                 "(label: gain over the student alone, pt; error bars: std over seeds)", fontsize=9)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
