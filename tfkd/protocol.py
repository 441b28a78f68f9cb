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

import numpy as np


from tfkd.errors import ConfigError, TrainingError

#: Folder of the protocols shipped with tfkd (``--protocol NAME`` looks here).
PROTOCOL_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "protocols"
PROTOCOL_KEYS = {"description", "dataset", "epochs", "batch_size", "seeds", "student", "students",
                 "set", "teachers", "runs", "pairs", "recipe", "published", "smoke"}
PUBLISHED_KEYS = {"sources", "teachers", "runs"}
TEACHER_KEYS = {"model", "set", "import", "init_from", "epochs", "description"}
RUN_KEYS = {"method", "teachers", "set", "ablation", "description", "seeds", "students"}
BASELINE = "student"
#: Runs the report compares every other run with, paired by seed (when the protocol has them).
REFERENCES = ("kd", "cft")


@dataclass
class Teacher:
    """A teacher the protocol makes once: trained from scratch (``model``), imported from a
    PyTorch checkpoint under ``--teachers-dir`` (``import``), or fine-tuned from another of the
    protocol's teachers (``init_from``); ``set`` holds its config overrides, ``epochs`` its own
    epoch count (``--epochs`` still overrides it)."""

    name: str
    model: str | None
    set: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    init_from: str | None = None
    epochs: int | None = None
    description: str = ""


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
    students: list[str] | None = None  # None: every student model of the protocol


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
    students: list[str] = field(default_factory=list)  # all student models; [student] for one
    #: Each student model's teachers by the role a run names (``plain: resnet56``); empty: a
    #: run names the protocol's teachers themselves, the same for every student.
    pairs: dict[str, dict[str, str]] = field(default_factory=dict)
    recipe: str = ""  # tfkd.recipes name every run is given (``--recipe``)
    #: Published test top-1 (%) to print beside ours: ``teachers: {name: [value, source]}``,
    #: ``runs: {run: {student: [value, source]}}``; ``sources``: what each source key is.
    published: dict[str, Any] = field(default_factory=dict)
    smoke: list[str] = field(default_factory=list)  # the runs of ``tfkd.bench accuracy --smoke``

    def teachers_of(self, run: Run, student: str) -> list[str]:
        """The protocol teachers ``run`` reads with ``student``: its roles through the student's
        pair, or the names it gives when the protocol has no pairs."""
        return [self.pairs[student][role] for role in run.teachers] if self.pairs else list(run.teachers)

    def entry(self, run: str, student: str) -> str:
        """The report's name of ``run`` with ``student``: the run's own name when the protocol
        has one student model, ``student/run`` when it has several."""
        return run if len(self.students) <= 1 else f"{student}/{run}"


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


def shipped() -> list[str]:
    """The names of the protocols shipped in ``benchmarks/protocols``."""
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))


def resolve(protocol: str) -> Path:
    """A protocol file: ``protocol`` itself if it is a file, else a shipped protocol's name."""
    path = Path(protocol)
    if path.is_file():
        return path
    named = PROTOCOL_DIR / f"{protocol}.yaml"
    if named.is_file():
        return named
    raise ConfigError(f"protocol {protocol!r}: not a file nor a shipped protocol "
                      f"({', '.join(shipped()) or 'none found in ' + str(PROTOCOL_DIR)})")


def load(protocol: str) -> Protocol:
    """Reads and checks a protocol file (YAML, read as data only)."""
    from tfkd.distill import methods

    from tfkd.config import read_yaml_file

    path = resolve(protocol)
    raw = _mapping(read_yaml_file(str(path), "protocol"), str(path))
    _known(raw, PROTOCOL_KEYS, str(path))
    for key in ("dataset", "epochs", "teachers", "runs"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key '{key}'")
    if ("student" in raw) == ("students" in raw):
        raise ConfigError(f"{path}: give 'student' (one model) or 'students' (a list), not "
                          f"{'both' if 'student' in raw else 'neither'}")
    students = [str(s) for s in (raw["students"] if "students" in raw else [raw["student"]])] \
        if isinstance(raw.get("students", []), list) else []
    if not students or len(set(students)) != len(students):
        raise ConfigError(f"{path}: students: expected a list of distinct model names")
    teachers: dict[str, Teacher] = {}
    for name, entry in _mapping(raw["teachers"], f"{path}: teachers").items():
        where = f"{path}: teachers.{name}"
        entry = _mapping(entry, where)
        _known(entry, TEACHER_KEYS, where)
        sources = [k for k in ("model", "import", "init_from") if k in entry]
        if len(sources) != 1 and sources != ["model", "init_from"]:
            raise ConfigError(f"{where}: give one of 'model' (train it), 'import' (a checkpoint) or "
                              f"'init_from' (fine-tune another teacher), got {sources or 'none'}")
        if "init_from" in entry and entry["init_from"] not in teachers:
            raise ConfigError(f"{where}: init_from {entry['init_from']!r} is not a teacher listed "
                              f"before it ({', '.join(teachers) or 'none'})")
        epochs_of = entry.get("epochs")
        if epochs_of is not None and (not isinstance(epochs_of, int) or epochs_of < 1):
            raise ConfigError(f"{where}: epochs: expected a positive integer, got {epochs_of!r}")
        teachers[name] = Teacher(name, entry.get("model"), _mapping(entry.get("set"), f"{where}.set"),
                                 entry.get("import"), entry.get("init_from"), epochs_of,
                                 str(entry.get("description", "")))
    pairs = _pairs(raw.get("pairs"), students, teachers, f"{path}: pairs")
    runs = {}
    for name, entry in _mapping(raw["runs"], f"{path}: runs").items():
        where = f"{path}: runs.{name}"
        entry = _mapping(entry, where)
        _known(entry, RUN_KEYS, where)
        method = entry.get("method")
        try:
            needed = len(methods.resolve(str(method)).teachers)
        except ConfigError:
            raise ConfigError(f"{where}: method {method!r}: expected one of {', '.join(methods.METHODS)} "
                              "or a composition like cft+dkd") from None
        run_teachers = list(entry.get("teachers") or [])
        if len(run_teachers) != needed:
            raise ConfigError(f"{where}: method {method} takes {needed} "
                              f"teacher(s), got {len(run_teachers)}")
        for teacher in run_teachers:
            if pairs and any(teacher not in roles for roles in pairs.values()):
                raise ConfigError(f"{where}: teacher role {teacher!r} is not in every student's "
                                  f"pairs entry ({', '.join(sorted({r for rs in pairs.values() for r in rs}))})")
            if not pairs and teacher not in teachers:
                raise ConfigError(f"{where}: teacher {teacher!r} is not in teachers "
                                  f"({', '.join(teachers)})")
        run_students = entry.get("students")
        if run_students is not None and (not isinstance(run_students, list) or not run_students
                                         or not set(run_students) <= set(students)):
            raise ConfigError(f"{where}.students: expected some of {', '.join(students)}, got {run_students!r}")
        runs[name] = Run(name, method, run_teachers, _mapping(entry.get("set"), f"{where}.set"),
                         bool(entry.get("ablation", False)), str(entry.get("description", "")),
                         _seeds(entry["seeds"], f"{where}.seeds") if "seeds" in entry else None,
                         [str(s) for s in run_students] if run_students else None)
    if BASELINE not in runs:
        raise ConfigError(f"{path}: runs: a run named '{BASELINE}' (the student alone) is needed "
                          "to report gains")
    seeds = _seeds(raw.get("seeds", [0]), f"{path}: seeds")
    epochs = raw["epochs"]
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"{path}: epochs: expected a positive integer, got {epochs!r}")
    recipe = str(raw.get("recipe") or "")
    if recipe:
        from tfkd import recipes

        try:
            recipes.get(recipe)
        except ConfigError as error:
            raise ConfigError(f"{path}: recipe: {error}") from None
    smoke = raw.get("smoke", [BASELINE])
    if not isinstance(smoke, list) or not smoke or not set(smoke) <= set(runs):
        raise ConfigError(f"{path}: smoke: expected a list of some of its runs ({', '.join(runs)}), got {smoke!r}")
    return Protocol(path.stem, path, str(raw["dataset"]), epochs, int(raw.get("batch_size", 128)),
                    seeds, students[0], teachers, runs, _mapping(raw.get("set"), f"{path}: set"),
                    str(raw.get("description", "")).strip(), students, pairs, recipe,
                    _published(raw.get("published"), teachers, runs, students, f"{path}: published"),
                    [str(r) for r in smoke])


def _pairs(value: Any, students: list[str], teachers: dict[str, Teacher], where: str) -> dict[str, dict[str, str]]:
    """``pairs``: every student model's teachers by role, each a teacher of the protocol."""
    pairs = {str(k): _mapping(v, f"{where}.{k}") for k, v in _mapping(value, where).items()}
    if pairs and set(pairs) != set(students):
        raise ConfigError(f"{where}: expected an entry for each student ({', '.join(students)}), "
                          f"got {', '.join(pairs)}")
    for student, roles in pairs.items():
        for role, teacher in roles.items():
            if teacher not in teachers:
                raise ConfigError(f"{where}.{student}.{role}: {teacher!r} is not in teachers ({', '.join(teachers)})")
    return {s: {str(r): str(t) for r, t in roles.items()} for s, roles in pairs.items()}


def _figure(value: Any, sources: dict[str, Any], where: str) -> list[Any]:
    """A published figure: ``[top-1 %, source key]``."""
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (int, float))
            and 0 <= value[0] <= 100 and value[1] in sources):
        raise ConfigError(f"{where}: expected [top-1 %, one of {', '.join(sources) or 'the sources'}], got {value!r}")
    return [float(value[0]), str(value[1])]


def _published(value: Any, teachers: dict[str, Teacher], runs: dict[str, Run], students: list[str],
               where: str) -> dict[str, Any]:
    """``published``: the sources, and figures of teachers and of runs by student model."""
    raw = _mapping(value, where)
    _known(raw, PUBLISHED_KEYS, where)
    sources = {str(k): str(v) for k, v in _mapping(raw.get("sources"), f"{where}.sources").items()}
    figures: dict[str, Any] = {"sources": sources, "teachers": {}, "runs": {}}
    for name, figure in _mapping(raw.get("teachers"), f"{where}.teachers").items():
        if name not in teachers:
            raise ConfigError(f"{where}.teachers.{name}: not a teacher of the protocol ({', '.join(teachers)})")
        figures["teachers"][name] = _figure(figure, sources, f"{where}.teachers.{name}")
    for run, by_student in _mapping(raw.get("runs"), f"{where}.runs").items():
        if run not in runs:
            raise ConfigError(f"{where}.runs.{run}: not a run of the protocol ({', '.join(runs)})")
        for student, figure in _mapping(by_student, f"{where}.runs.{run}").items():
            if student not in students:
                raise ConfigError(f"{where}.runs.{run}.{student}: not a student model ({', '.join(students)})")
            figures["runs"].setdefault(run, {})[student] = _figure(figure, sources, f"{where}.runs.{run}.{student}")
    return figures


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
    """One process of the protocol: ``python -m tfkd.train`` (a teacher or a student run) or
    ``python -m tfkd.import_pytorch`` (an imported teacher)."""

    kind: str  # "import", "teacher" or "student"
    name: str  # the protocol's teacher name, or the report's entry name of a student run
    seed: int
    run_dir: Path
    args: list[str]
    run: str = ""  # a student job's protocol run
    student: str = ""  # a student job's model
    needs: tuple[Path, ...] = ()  # run folders of the teachers this job reads

    @property
    def label(self) -> str:
        """``KIND NAME seed N``, as progress lines name the job."""
        return f"{self.kind} {self.name} seed {self.seed}"

    @property
    def stage(self) -> str:
        """The pipeline stage this job runs (``teacher`` or ``distill``)."""
        return "distill" if self.kind == "student" else "teacher"

    @property
    def module(self) -> str:
        """The command this job runs."""
        return "tfkd.import_pytorch" if self.kind == "import" else "tfkd.train"

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
        (options added since) not compared. An imported teacher is compared by its source."""
        if not self.run_dir.is_dir():
            return None
        from tfkd import rundir

        if self.kind == "import":
            record = _result(self.run_dir, "import")
            source = self.args[0]
            if record and Path(source).is_file() and record.get("source_sha256") != rundir.sha256(source):
                return f"source {source}: another checkpoint than the one imported there"
            return None
        from tfkd.arguments import config_from_argv

        cfg = config_from_argv(self.args)
        now = rundir.stage_settings(cfg, self.stage, teachers=cfg.distill.teachers)
        found = rundir.differences(rundir.recorded_settings(self.run_dir, self.stage), now)
        return found[0] if found else None


def _result(run_dir: Path, kind: str) -> dict[str, Any] | None:
    if kind == "import":  # the imported model and its record (tfkd.import_pytorch)
        record = run_dir / "teacher.json"
        if not (record.is_file() and (run_dir / "teacher.keras").is_file()):
            return None
        return json.loads(record.read_text())
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    stages = json.loads(path.read_text()).get("stages", {})
    result = stages.get("teacher" if kind == "teacher" else "distill")
    artifact = run_dir / ("teacher.keras" if kind == "teacher" else "student.keras")
    return result if result and artifact.is_file() else None


#: The folders a benchmark command names, as a committed report shows them when they are this
#: machine's (absolute); CIFAR-100's folder keeps its own name.
_FOLDERS = {"--data-dir": "path/to/cifar-10-batches-py", "--teachers-dir": "path/to/teachers",
            "--out": "path/to/out"}


def portable(argv: Sequence[str]) -> list[str]:
    """``argv`` with this machine's folders (absolute paths) replaced by placeholders, and a
    protocol file of the repository named relative to it, so a committed report names no
    machine's paths."""
    repo = PROTOCOL_DIR.parents[1]
    result, previous = [], ""
    for arg in argv:
        if previous in _FOLDERS and Path(arg).is_absolute():
            arg = "path/to/cifar-100-python" if Path(arg).name == "cifar-100-python" else _FOLDERS[previous]
        elif previous == "--protocol" and Path(arg).is_absolute():
            arg = os.path.relpath(arg, repo) if Path(arg).resolve().is_relative_to(repo) else "path/to/protocol.yaml"
        result.append(arg)
        previous = arg if arg.startswith("--") else ""
    return result


def teacher_file(out: Path, name: str) -> Path:
    """Where the protocol's teacher ``name`` lives (trained or imported)."""
    return out / "runs" / "teachers" / name / "teacher.keras"


def jobs(protocol: Protocol, out: Path, data_dir: str | None, epochs: int | None = None,
         seeds: Sequence[int] | None = None, only: Sequence[str] | None = None,
         overrides: Sequence[str] = (), validation_only: bool = False,
         teachers_dir: str | None = None) -> list[Job]:
    """Every process the protocol needs, teachers first, in protocol order.

    Each student run uses ``seeds`` when given, else its own ``seeds`` in the protocol file, else
    the protocol's, for each of its student models; teachers are made once, with the first of
    ``seeds`` or the protocol's (a teacher another one starts from is made first). Imported
    teachers come from ``teachers_dir``.
    """
    teacher_seed = (list(seeds) if seeds else protocol.seeds)[0]
    for name in only or []:
        if name not in protocol.runs:
            raise ConfigError(f"--only {name}: not a run of {protocol.name} "
                              f"({', '.join(protocol.runs)})")
    selected = [protocol.runs[name] for name in (only or protocol.runs)]
    data_flags = ["--dataset", protocol.dataset, *(["--data-dir", data_dir] if data_dir else [])]
    common = [*data_flags, "--epochs", str(epochs or protocol.epochs),
              "--batch-size", str(protocol.batch_size), "--set", "progress=2",
              *(["--recipe", protocol.recipe] if protocol.recipe else [])]
    extra = {kind: [item for o in overrides if _applies(o.split("=", 1)[0].strip(), kind)
                    for item in ("--set", o)] for kind in ("teacher", "student")}
    tuning = ["--set", "data.evaluate_test=false"] if validation_only else []
    needed = {t for run in selected for student in run.students or protocol.students
              for t in protocol.teachers_of(run, student)}
    for name in list(protocol.teachers)[::-1]:  # what a needed teacher starts from is needed too
        if name in needed and protocol.teachers[name].init_from:
            needed.add(protocol.teachers[name].init_from)
    result = []
    for name in (t for t in protocol.teachers if t in needed):  # teachers: first seed only
        teacher = protocol.teachers[name]
        run_dir = teacher_file(out, name).parent
        if teacher.checkpoint:
            if not teachers_dir:
                raise ConfigError(f"teacher {name} imports {teacher.checkpoint}: pass --teachers-dir "
                                  "(or set TFKD_TEACHERS_DIR)")
            result.append(Job("import", name, teacher_seed, run_dir, [
                str(Path(teachers_dir) / teacher.checkpoint), "--out", str(run_dir / "teacher.keras"),
                *data_flags]))
            continue
        model = ["--teacher-model", teacher.model] if teacher.model else []
        start = ["--set", f"teacher.init_from={teacher_file(out, teacher.init_from)}"] if teacher.init_from else []
        own_epochs = ["--epochs", str(teacher.epochs)] if teacher.epochs and not epochs else []
        result.append(Job("teacher", name, teacher_seed, run_dir, [
            "--stage", "teacher", "--method", "cft", *model, "--seed", str(teacher_seed),
            "--run-dir", str(run_dir), *common, *own_epochs, *start,
            *_set_flags(protocol.set, "teacher"), *_set_flags(teacher.set), *extra["teacher"]],
            needs=(teacher_file(out, teacher.init_from).parent,) if teacher.init_from else ()))
    for run in selected:
        for student in run.students or protocol.students:
            entry = protocol.entry(run.name, student)
            for seed in list(seeds or run.seeds or protocol.seeds):
                run_dir = out / "runs" / entry / f"seed{seed}"
                teachers = protocol.teachers_of(run, student)
                teacher_flags = [item for t in teachers for item in ("--teacher", str(teacher_file(out, t)))]
                result.append(Job("student", entry, seed, run_dir, [
                    "--stage", "distill", "--method", run.method, "--student-model", student,
                    *teacher_flags, "--seed", str(seed), "--run-dir", str(run_dir), *common, *tuning,
                    *_set_flags(protocol.set, "student"), *_set_flags(run.set), *extra["student"]],
                    run=run.name, student=student,
                    needs=tuple(teacher_file(out, t).parent for t in teachers)))
    return result


def _launch(job: Job, log: Path | None = None, threads: int | None = None) -> None:
    """Runs ``job`` as its own process; its output goes to ``log`` when given (runs side by
    side), else to this process's. ``threads``: TensorFlow's intra-op thread count (unless the
    environment sets one)."""
    command = [sys.executable, "-m", job.module, *job.args]
    print(f"tfkd.bench: {job.label}: {' '.join(command[1:])}"
          + (f" (output: {log})" if log else ""), flush=True)
    env = dict(os.environ)
    if threads:
        env.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
        env.setdefault("TF_NUM_INTEROP_THREADS", "1")
    if log is None:
        status = subprocess.run(command, env=env).returncode
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as stream:
            status = subprocess.run(command, env=env, stdout=stream, stderr=subprocess.STDOUT).returncode
    if status != 0:
        where = f"{log} and {job.run_dir}" if log else str(job.run_dir)
        raise TrainingError(f"{job.label} failed with exit code {status}; see {where}; re-run the "
                            "same command to continue")


def launch_here(job: Job) -> None:
    """Runs ``job`` in this process (``tfkd.bench accuracy --smoke``: it saves each run's start-up;
    a protocol's real runs each get a process of their own)."""
    import importlib

    print(f"tfkd.bench: {job.label}: {job.module} {' '.join(job.args)} (in this process)", flush=True)
    status = importlib.import_module(job.module).main(job.args)
    if status != 0:
        raise TrainingError(f"{job.label} failed with exit code {status}; see {job.run_dir}; re-run the "
                            "same command to continue")


def _check_done(job: Job) -> None:
    if not job.done():
        raise TrainingError(f"{job.label} ended without results in {job.run_dir}/metrics.json")


def execute(pending: list[Job], launch: Callable[[Job], None], parallel: int = 1,
            progress: Callable[[], None] = lambda: None) -> None:
    """Runs ``pending`` in order, up to ``parallel`` at a time: a job starts once the teachers it
    reads (``Job.needs``) are finished, the first ready job first. After a failure no new job
    starts; the ones running finish, then the first error is raised. ``progress`` is called as
    each job ends."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    waiting, running, finished = list(pending), {}, set()
    unfinished = {job.run_dir for job in pending}
    error: BaseException | None = None

    def ready(job: Job) -> bool:
        return all(need in finished or need not in unfinished for need in job.needs)

    parallel = max(parallel, 1)
    with ThreadPoolExecutor(parallel) as pool:
        while running or (waiting and error is None):
            while error is None and len(running) < parallel:
                job = next((j for j in waiting if ready(j)), None)
                if job is None:
                    break
                waiting.remove(job)
                running[pool.submit(launch, job)] = job
            if not running:  # only if jobs wait on each other (no protocol makes such a cycle)
                raise TrainingError(f"{waiting[0].label} waits for teachers that wait for it: "
                                    f"{', '.join(map(str, waiting[0].needs))}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                try:
                    future.result()
                    _check_done(job)
                except BaseException as caught:  # noqa: BLE001 - re-raised once the others end
                    error = error or caught
                    continue
                finished.add(job.run_dir)
                print(f"tfkd.bench: done: {job.label}", flush=True)
                progress()
    if error is not None:
        raise error


def run_protocol(protocol: Protocol, out: Path, job_list: list[Job], command: str,
                 launch: Callable[[Job], None] | None = None,
                 report_jobs: list[Job] | None = None, parallel: int = 1,
                 name: str = "results") -> dict[str, Any]:
    """Runs every unfinished job (finished ones are cached), ``parallel`` at a time, then writes
    the report of ``report_jobs`` (default: the jobs run; pass the whole protocol's so that
    running a subset with ``--only`` still reports every finished run). Side by side, each run
    gets an equal share of the cores as TensorFlow threads and writes its output to
    ``OUT/logs/``."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    pending = [job for job in job_list if not job.done()]
    print(f"tfkd.bench: {protocol.name}: {len(job_list) - len(pending)} of {len(job_list)} runs "
          f"cached in {out / 'runs'}, {len(pending)} to run"
          + (f", {parallel} at a time (output in {out / 'logs'})" if parallel > 1 and pending else ""),
          flush=True)
    if launch is None:
        if parallel > 1:
            threads = max(1, (os.cpu_count() or 1) // parallel)

            def launch(job: Job) -> None:
                log = out / "logs" / f"{job.name.replace('/', '-')}-seed{job.seed}.log"
                _launch(job, log, threads)
        else:
            launch = _launch
    with tqdm(total=len(pending), desc=protocol.name, unit="run", disable=not pending) as bar:
        execute(pending, launch, parallel, progress=lambda: bar.update(1))
    return report(protocol, out, report_jobs or job_list, command, name)


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


def provenance(command: str) -> dict[str, Any]:
    """What a committed benchmark result records beside its figures: the command that produced
    it, the git commit, the date (UTC) and the machine."""
    from tfkd.rundir import code_commit

    return {"command": command, "git_commit": code_commit(),
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


#: Resamples of the two-level bootstrap behind every interval in a report.
RESAMPLES = 2000


def _predictions(run_dir: Path) -> np.ndarray | None:
    """A finished run's per-image test correctness (``test_predictions.npz``), or None."""
    path = run_dir / "test_predictions.npz"
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as saved:
        return saved["predictions"] == saved["labels"]


def bootstrap(correct: dict[str, dict[int, np.ndarray]], resamples: int = RESAMPLES,
              seed: int = 0) -> tuple[list[int], dict[str, np.ndarray]]:
    """Two-level bootstrap of test accuracy, paired across runs: each resample draws seeds with
    replacement from the seeds every run has, and for each drawn seed the test images with
    replacement; every run is scored on the same draw. Returns the seeds used and, per run, the
    ``resamples`` bootstrap accuracies (means over the drawn seeds)."""
    seeds = sorted(set.intersection(*(set(v) for v in correct.values()))) if correct else []
    if not seeds:
        return [], {}
    rng = np.random.default_rng(seed)
    per_seed = {name: np.empty((len(seeds), resamples)) for name in correct}
    for i, s in enumerate(seeds):
        sizes = {len(correct[name][s]) for name in correct}
        if len(sizes) != 1:
            raise ValueError(f"seed {s}: runs were tested on different numbers of images {sorted(sizes)}")
        n = sizes.pop()
        for start in range(0, resamples, 250):
            rows = min(250, resamples - start)
            draw = rng.integers(0, n, (rows, n))
            for name in correct:
                per_seed[name][i, start:start + rows] = correct[name][s][draw].mean(axis=1)
    picks = rng.integers(0, len(seeds), (resamples, len(seeds)))
    columns = np.arange(resamples)[:, None]
    return seeds, {name: values[picks, columns].mean(axis=1) for name, values in per_seed.items()}


def _interval(values: np.ndarray) -> list[float]:
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def _comparisons(protocol: Protocol, runs: dict[str, Any], correct: dict[str, dict[int, np.ndarray]]) -> dict[str, Any]:
    """Paired differences of every run to ``kd`` and ``cft`` (same student model, same seeds)
    with 95% bootstrap intervals, and per student model cft's gain over the student alone
    divided by kd's, with its interval."""
    ratios: dict[str, Any] = {}
    for student in protocol.students:
        names = {r: protocol.entry(r, student) for r in (BASELINE, *REFERENCES)}
        for name, entry in runs.items():
            if entry["student"] != student:
                continue
            entry["vs"] = {}
            for ref in REFERENCES:
                other = names[ref]
                if other == name or name not in correct or other not in correct:
                    continue
                seeds, boot = bootstrap({name: correct[name], other: correct[other]})
                if not seeds:
                    continue
                point = np.mean([correct[name][s].mean() - correct[other][s].mean() for s in seeds])
                entry["vs"][ref] = {"diff": float(point), "ci": _interval(boot[name] - boot[other]),
                                    "seeds": seeds}
        trio = [names[BASELINE], names["kd"], names["cft"]]
        if all(n in correct for n in trio):
            seeds, boot = bootstrap({n: correct[n] for n in trio})
            if seeds:
                base, kd, cft = (np.mean([correct[n][s].mean() for s in seeds]) for n in trio)
                with np.errstate(divide="ignore", invalid="ignore"):
                    draws = (boot[trio[2]] - boot[trio[0]]) / (boot[trio[1]] - boot[trio[0]])
                finite = draws[np.isfinite(draws)]
                ratios[student] = {"value": float((cft - base) / (kd - base)) if kd != base else None,
                                   "ci": _interval(finite) if len(finite) else None, "seeds": seeds}
    return ratios


def report(protocol: Protocol, out: Path, job_list: list[Job], command: str,
           name: str = "results") -> dict[str, Any]:
    """Collects the finished runs into results.json, results.md and results.png in ``out``
    (``name``.json, ... with another ``name``).

    Every row gets mean ± std over its seeds and its gain over the student alone; where the
    runs saved their per-image test predictions, also its paired difference to ``kd`` and to
    ``cft`` with a 95% interval (``bootstrap``), and cft's gain over kd's with its interval.
    """
    from tfkd import io

    teachers, runs = {}, {}
    correct: dict[str, dict[int, np.ndarray]] = {}
    finished = {id(job): _finished(job) for job in job_list}
    for job in job_list:
        result = (_result(job.run_dir, job.kind) if finished[id(job)] else None) or {}
        if job.kind in ("teacher", "import"):
            teachers[job.name] = {key: result.get(key) for key in (
                "model", "lambda_cls", "lambda_rec", "init_from", "init_test_accuracy", "val_accuracy",
                "test_accuracy", "test_psnr", "params", "train_images_per_second", "wall_seconds",
                "epochs_seconds")}
            teachers[job.name]["finished"] = finished[id(job)]
            teachers[job.name]["published"] = protocol.published.get("teachers", {}).get(job.name)
            teachers[job.name]["commit"] = _run_commit(job) if finished[id(job)] else None
            teachers[job.name]["kind"] = "imported" if job.kind == "import" else (
                "fine-tuned" if protocol.teachers[job.name].init_from else "trained")
            if job.kind == "teacher" and protocol.teachers[job.name].init_from:
                teachers[job.name]["init_from"] = protocol.teachers[job.name].init_from
            continue
        run = protocol.runs[job.run]
        entry = runs.setdefault(job.name, {
            "run": run.name, "student": job.student, "method": run.method,
            "teachers": protocol.teachers_of(run, job.student),
            "published": protocol.published.get("runs", {}).get(run.name, {}).get(job.student),
            "set": run.set, "ablation": run.ablation, "description": run.description, "seeds": {}})
        entry["seeds"][str(job.seed)] = {"finished": finished[id(job)], **{key: result.get(key) for key in (
            "val_accuracy", "test_accuracy", "train_images_per_second", "wall_seconds",
            "epochs_seconds")}, "commit": _run_commit(job) if finished[id(job)] else None}
        flags = _predictions(job.run_dir) if finished[id(job)] else None
        if flags is not None:
            correct.setdefault(job.name, {})[job.seed] = flags
    for entry in runs.values():
        for split in ("val", "test"):
            entry[split] = _summary([s[f"{split}_accuracy"] for s in entry["seeds"].values()])
    for entry in runs.values():
        base = runs.get(protocol.entry(BASELINE, entry["student"]), {})
        for split in ("val", "test"):
            mean, ref = entry[split]["mean"], base.get(split, {}).get("mean")
            entry[split]["gain_over_student"] = None if mean is None or ref is None else mean - ref
    ratios = _comparisons(protocol, runs, correct)
    first = protocol.students[0]
    kd_gain = runs.get(protocol.entry("kd", first), {}).get("test", {}).get("gain_over_student")
    cft_gain = runs.get(protocol.entry("cft", first), {}).get("test", {}).get("gain_over_student")
    results = {
        "protocol": protocol.name, "protocol_file": str(protocol.path),
        "description": protocol.description, "dataset": protocol.dataset,
        "student": protocol.student, "students": protocol.students,
        "epochs": _first_epochs(job_list, protocol), "batch_size": protocol.batch_size,
        "seeds": sorted({job.seed for job in job_list if job.kind == "student"}),
        **provenance(command),
        "complete": all(finished.values()),
        "teachers": teachers, "runs": runs,
        "recipe": protocol.recipe or None, "published_sources": protocol.published.get("sources", {}),
        "run_seconds": _run_seconds(teachers, runs),
        "run_commits": _run_commits(teachers, runs),
        "cft_gain_over_kd_gain": None if not kd_gain or cft_gain is None else cft_gain / kd_gain,
        "gain_ratio_intervals": ratios,
        "interval_method": f"95% percentile interval of a two-level paired bootstrap ({RESAMPLES} "
                           "resamples): seeds drawn with replacement, then each seed's test images; "
                           "both runs scored on the same draw",
    }
    io.write_json(out / f"{name}.json", results)
    io.write_text(out / f"{name}.md", markdown(results))
    plot(results, out / f"{name}.png")
    return results


def _run_commit(job: Job) -> str | None:
    """The commit of the code that made a finished run (its ``run.json`` record; an imported
    teacher's record has none)."""
    from tfkd import rundir

    return rundir.load_records(job.run_dir).get(job.stage, {}).get("commit") if job.kind != "import" else None


def _run_commits(teachers: dict[str, Any], runs: dict[str, Any]) -> dict[str, int]:
    """How many finished teacher and student runs each commit made (``unrecorded``: runs made
    before records named it, or by a copy that does not know its commit)."""
    counts: dict[str, int] = {}
    records = [t for t in teachers.values() if t["kind"] != "imported" and t["finished"]]
    records += [s for r in runs.values() for s in r["seeds"].values() if s["finished"]]
    for record in records:
        key = record.get("commit") or "unrecorded"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _run_seconds(teachers: dict[str, Any], runs: dict[str, Any]) -> float:
    """The summed time of the finished teacher and student runs: each run's epochs across resumes
    (``epochs_seconds``), or for a run recorded without them, its last process's wall time."""
    records = list(teachers.values())
    records += [s for r in runs.values() for s in r["seeds"].values() if s["finished"]]
    return float(sum(r.get("epochs_seconds") or r.get("wall_seconds") or 0.0 for r in records))


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


def _published_cell(figure: list[Any] | None) -> str:
    return "—" if not figure else f"{figure[0]:.2f} [{figure[1]}]"


def _vs_cell(comparison: dict[str, Any] | None) -> str:
    if not comparison:
        return "—"
    lo, hi = comparison["ci"]
    return f"{comparison['diff'] * 100:+.2f} [{lo * 100:+.2f}, {hi * 100:+.2f}]"


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: teachers, then one row per student run (with paired
    differences to kd and cft and their intervals where the runs saved predictions)."""
    machine = results["machine"]
    students = results.get("students") or [results["student"]]
    lines = [f"# {results['protocol']}: {results['dataset']}, student{'s' if len(students) > 1 else ''} "
             f"{', '.join(students)}, {results['epochs']} epochs, batch {results['batch_size']}, "
             f"seeds {', '.join(map(str, results['seeds']))}", ""]
    if not results["complete"]:
        lines += ["**Incomplete**: some runs have not finished; missing figures show as —.", ""]
    started = any(t.get("init_from") or t.get("kind") == "imported" for t in results["teachers"].values())
    published = results.get("published_sources") or {}
    lines += ["| teacher | model | lambda_cls | lambda_rec | val top-1 % | test top-1 % | test PSNR dB |"
              + (" made | test top-1 % before |" if started else "") + (" published test top-1 % |" if published else ""),
              "| --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if started else "")
              + (" --- |" if published else "")]
    for name, t in results["teachers"].items():
        psnr = "—" if t.get("test_psnr") is None or not t.get("lambda_rec") else f"{t['test_psnr']:.2f}"
        weights = ["—" if t.get(k) is None else t[k] for k in ("lambda_cls", "lambda_rec")]
        made = (t.get("kind") or "trained") + (f" from {t['init_from']}" if t.get("init_from") else "")
        lines.append(f"| {name} | {t.get('model') or '—'} | {weights[0]} | "
                     f"{weights[1]} | {_pct(t.get('val_accuracy'))} | "
                     f"{_pct(t.get('test_accuracy'))} | {psnr} |"
                     + (f" {made} | {_pct(t.get('init_test_accuracy'))} |" if started else "")
                     + (f" {_published_cell(t.get('published'))} |" if published else ""))
    paired = any(r.get("vs") for r in results["runs"].values())
    lines += ["", "| run | method | teachers | overrides | seeds | val top-1 % | test top-1 % | "
                  "test gain over student (pt) |" + (" vs kd (pt, 95% CI) | vs cft (pt, 95% CI) |" if paired else "")
              + (" published test top-1 % |" if published else ""),
              "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if paired else "")
              + (" --- |" if published else "")]
    for name, r in results["runs"].items():
        overrides = ", ".join(f"{k}={v}" for k, v in r["set"].items()) or "—"
        test = r["test"]
        vs = r.get("vs") or {}
        lines.append(f"| {name}{' (ablation)' if r['ablation'] else ''} | {r['method']} | "
                     f"{', '.join(r['teachers']) or '—'} | {overrides} | {_seeds_cell(r['seeds'])} | "
                     f"{_pct(r['val']['mean'], r['val']['std'], r['val']['n'])} | "
                     f"{_pct(test['mean'], test['std'], test['n'])} | "
                     f"{_pct(test['gain_over_student'], signed=True)} |"
                     + (f" {_vs_cell(vs.get('kd'))} | {_vs_cell(vs.get('cft'))} |" if paired else "")
                     + (f" {_published_cell(r.get('published'))} |" if published else ""))
    if published:
        lines += ["", "Published: " + "; ".join(f"[{key}] {text}" for key, text in published.items())
                  + (f". Our runs use the recipe `{results['recipe']}`" if results.get("recipe") else "") + "."]
    ratio = results.get("cft_gain_over_kd_gain")
    if any(r["test"]["n"] > 1 for r in results["runs"].values()):
        lines += ["", "With several seeds: mean ± sample standard deviation over them; a gain is "
                      "the difference of the means."]
    if paired:
        lines += ["", f"vs kd / vs cft: the paired difference of test top-1 (this run minus that one, "
                      f"same seeds), with its {results.get('interval_method', '95% interval')}. An "
                      "interval that holds 0 is no measurable difference."]
    intervals = results.get("gain_ratio_intervals") or {}
    if intervals:
        for student, r in intervals.items():
            ci = "—" if not r.get("ci") else f"[{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"
            value = "—" if r.get("value") is None else f"{r['value']:.2f}x"
            lines += ["", f"{student}: cft's gain over the student alone / kd's gain: {value}, 95% CI {ci} "
                          f"(seeds {', '.join(map(str, r['seeds']))})"]
        lines.append("")
    else:
        lines += ["", f"cft's gain over the student alone / kd's gain: "
                      f"{'—' if ratio is None else f'{ratio:.2f}x'}", ""]
    if results.get("run_seconds"):
        lines += [f"Run time: {results['run_seconds'] / 3600:.1f} h, the finished runs' times summed "
                  "(each run's epochs across resumes; a run that did not record them: its last "
                  "process's wall time; on a shared machine a run takes longer than alone)", ""]
    made = results.get("run_commits") or {}
    if made:
        lines += ["Runs made by: " + ", ".join(
            f"{'`' + c[:10] + '`' if c != 'unrecorded' else 'an unrecorded commit'} ({n} run{'s' * (n != 1)})"
            for c, n in sorted(made.items(), key=lambda item: -item[1])), ""]
    lines += [f"Command: `{results['command']}`  ",
              f"Report commit: `{results['git_commit']}`, date {results['date']}  ",
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
    alone = {n for n in names if results["runs"][n].get("run", n) == BASELINE}
    colors = ["#999999" if n in alone else ("#8fb3d9" if results["runs"][n]["ablation"] else "#2b6cb0")
              for n in names]
    bars = ax.bar(names, means, color=colors)
    spread = [i for i, n in enumerate(names) if results["runs"][n]["test"]["n"] > 1]
    if spread:  # error bars only where there are seeds to spread over (one seed: no std, no bar)
        ax.errorbar([names[i] for i in spread], [means[i] for i in spread],
                    yerr=[stds[i] for i in spread], fmt="none", ecolor="black", capsize=3)
    for bar, name, std in zip(bars, names, stds):
        gain = results["runs"][name]["test"]["gain_over_student"]
        label = "—" if results["runs"][name]["test"]["mean"] is None else (
            "alone" if name in alone else "no student yet" if gain is None else f"{gain * 100:+.2f}")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height() + std),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    present = [m for m in means if m > 0]
    if present:
        ax.set_ylim(max(0.0, min(present) - 5), min(100.0, max(present) + 3))
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{results['protocol']}: {', '.join(results.get('students') or [results['student']])} "
                 f"student, {results['epochs']} epochs\n"
                 "(label: gain over the student alone, pt; error bars: std over seeds)", fontsize=9)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
