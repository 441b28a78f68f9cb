"""The run folder: one process at a time, and a record of what each artifact was made with.

- ``RunLock``: ``RUN_DIR/.lock`` holds the pid (and start time) of the process training there; a
  second process exits with a message naming it, and a lock whose process is gone (killed) is
  recognized as stale and taken over.
- ``run.json``: for every stage (``teacher``, ``teacher1``, ``teacher2``, ``distill``, ``export``)
  the settings it read, written when the stage starts and marked ``done`` with its artifact. A
  re-run compares the settings it would use with the record and refuses, naming the keys, when
  they differ (``--retrain`` retrains that stage instead); ``tfkd.bench`` decides whether a cached
  run is still valid with the same comparison.
- ``dataset.json`` says which dataset the folder holds; a run on another dataset is refused.
- Each stage's record also names the commit of the code that made it (``code_commit``).

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from tfkd.errors import ConfigError

RECORD = "run.json"
LOCK = ".lock"
#: Settings every training stage reads besides its own section.
TRAINING_KEYS = ("seed", "deterministic", "sync_batchnorm", "mixed_precision", "data.batch_size",
                 "data.augment", "data.hflip", "data.shuffle_buffer", "data.validation_fraction",
                 "data.test_fraction", "data.subset", "data.image_size", "data.crop_fraction",
                 "data.crop_scale_min", "data.skip_bad_files")
#: Fields of dataset.json that identify the dataset a folder holds.
DATASET_FIELDS = ("class_names", "image_shape", "num_train", "num_val", "num_test")


# ----------------------------------------------------------------------------- the folder path
def folder_problem(path_text: str) -> str | None:
    """Why tfkd could not create or write the folder ``path_text`` (None: it can), checked
    without creating anything: a file in the way, a name too long, a read-only parent."""
    path = Path(path_text).expanduser()
    for part in path.parts:
        if len(os.fsencode(part)) > 255:
            return f"the name {part[:24]}... is longer than the file system allows (255 bytes)"
    if len(os.fsencode(str(path.absolute()))) > 4095:
        return "the path is longer than the file system allows"
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


# ----------------------------------------------------------------------------- the lock
def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), to tell a live owner from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


class RunLock:
    """Exclusive use of a run folder by this process (a context manager)."""

    def __init__(self, folder: str | os.PathLike, command: str = "") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.command = command
        self.took_over: dict[str, Any] | None = None

    def _owner(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        """Takes the lock or raises ``ConfigError`` naming the process that holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "start": _process_start(os.getpid()), "host": socket.gethostname(),
              "time": time.time(), "command": self.command}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if not owner:  # being written by its owner right now, or damaged
                    time.sleep(0.2)
                    owner = self._owner()
                pid = int(owner.get("pid", -1)) if str(owner.get("pid", "")).lstrip("-").isdigit() else -1
                same_host = owner.get("host") == me["host"]
                if owner and (not same_host or _alive(pid, owner.get("start"))):
                    where = "" if same_host else f" on host {owner.get('host')}"
                    raise ConfigError(
                        f"{self.folder}: in use by another tfkd process (pid {pid}{where}, "
                        f"{owner.get('command') or 'started ' + time.ctime(owner.get('time', 0))}); "
                        f"wait for it to finish or choose another --run-dir (if no such process "
                        f"exists, remove {self.path})")
                self.took_over = owner
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._remove_stale_temporaries()
            return self
        raise ConfigError(f"{self.path}: could not take the lock of this run folder")

    def _remove_stale_temporaries(self) -> None:
        """Removes the half-written files (``tfkd.io.atomic_path``'s ``.tmp-<pid>-NAME``) that a
        killed process left here: with the lock taken, no other process is writing them."""
        import re
        import shutil

        for path in sorted(self.folder.rglob(".tmp-*"), reverse=True):
            if not re.match(r"\.tmp-\d+-.", path.name) or not path.exists():
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def release(self) -> None:
        """Removes the lock if this process still owns it."""
        if self._owner().get("pid") == os.getpid():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def process_alive(pid: int) -> bool:
    """True if process ``pid`` runs on this machine."""
    return _alive(pid, None)


@contextlib.contextmanager
def reading(run_dir: str | os.PathLike, command: str) -> Iterator[None]:
    """Holds a run folder's lock while ``command`` reads its artifacts (an export, a compress),
    so that no training replaces them meanwhile (``ConfigError`` naming the process that holds
    it); a folder this process holds already (the pipeline's own export) is read as it is, and
    a folder that is not a tfkd run folder (no ``dataset.json``) is not locked."""
    folder = Path(run_dir)
    lock = RunLock(folder, command)
    owner = lock._owner()
    if not (folder / "dataset.json").is_file() or (
            owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()):
        yield
        return
    with lock:
        yield


def remove_stale_temporaries(folder: Path, suffix: str) -> list[Path]:
    """Removes ``.tmp-PID-<suffix>`` and ``.old-PID-<suffix>`` folders in ``folder`` left by a
    killed process (PID no longer running); returns them."""
    import shutil

    removed = []
    for kind in (".tmp-", ".old-"):
        for path in folder.glob(f"{kind}*-{suffix}"):
            pid = path.name[len(kind):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
    return removed


# ----------------------------------------------------------------------------- what was made how
def sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file (teachers are identified by content, not by path); for a path
    that is not a file, ``missing:<path>`` (never equal to a real digest)."""
    if not Path(path).is_file():
        return f"missing:{path}"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stage_settings(cfg: Any, stage: str, lambdas: tuple[float, float] | None = None,
                   teachers: Iterable[str | os.PathLike] = ()) -> dict[str, Any]:
    """The settings ``stage`` reads, as ``{dotted key: value}``: what its artifact depends on.

    A teacher stage reads ``teacher.*`` (with the plan's ``lambdas`` for mktn's two teachers), the
    distill stage ``student.*``, the method and the ``distill.*`` options the method reads, and its
    teachers' contents (SHA-256); both read the training keys; export reads ``export.*``.
    """
    from tfkd import config as config_lib
    from tfkd.distill.methods import reads_option

    flat = config_lib.flatten(cfg)
    if stage == "export":
        return {k: v for k, v in flat.items() if k.startswith("export.")}
    picked = {k: flat[k] for k in TRAINING_KEYS if k in flat}
    picked["data.dataset"] = flat["data.dataset"]
    if stage.startswith("teacher"):
        picked.update({k: v for k, v in flat.items() if k.startswith("teacher.")})
        if picked.get("teacher.init_from"):  # by content, like distill.teachers
            init = Path(picked["teacher.init_from"])
            picked["teacher.init_from"] = sha256(init / "teacher.keras" if init.is_dir() else init)
        if lambdas is not None:
            picked["teacher.lambda_cls"], picked["teacher.lambda_rec"] = lambdas
        return picked
    method = flat["distill.method"]
    picked.update({k: v for k, v in flat.items() if k.startswith("student.")})
    picked.update({k: v for k, v in flat.items() if k.startswith("distill.") and k != "distill.teachers"
                   and reads_option(method, k.split(".", 1)[1])})
    picked["distill.teachers"] = [sha256(Path(t) / "teacher.keras" if Path(t).is_dir() else t)
                                  for t in teachers]
    return picked


def load_records(run_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``run.json``'s stage records (empty for a new folder). Raises ``ConfigError`` when the
    file is damaged (the folder then cannot be trusted to describe its artifacts)."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        stages = data["stages"]
        if not isinstance(stages, dict):
            raise TypeError
        return stages
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{path}: damaged run record (expected JSON with 'stages'); remove the "
                          "run folder or choose another --run-dir") from None


#: Written by ``git archive`` (the ``export-subst`` attribute in .gitattributes): the commit of an
#: exported copy of the repository, which has no .git of its own.
_ARCHIVED_COMMIT = Path(__file__).with_name("COMMIT")


def code_commit() -> str | None:
    """The commit of the tfkd code running: the git checkout it sits in, or, for a copy exported
    with ``git archive``, the commit recorded in ``tfkd/COMMIT``; None if neither says."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        top, head = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                                   text=True, cwd=root, check=True).stdout.splitlines()
        if Path(top).resolve() == root:
            return head
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    try:
        text = _ARCHIVED_COMMIT.read_text().strip()
    except OSError:
        return None
    return text if len(text) == 40 and all(c in "0123456789abcdef" for c in text) else None


def write_record(run_dir: str | os.PathLike, stage: str, settings: dict[str, Any], status: str,
                 artifact: str | None = None) -> None:
    """Records ``stage``'s settings and status (``training`` or ``done``) in ``run.json``."""
    from tfkd import io

    records = load_records(run_dir)
    records[stage] = {"status": status, "artifact": artifact, "settings": settings, "time": time.time(),
                      "commit": code_commit()}
    io.write_json(Path(run_dir) / RECORD, {"format": 1, "stages": records})


def teacher_model(teacher: str | os.PathLike) -> str | None:
    """The backbone a teacher file (or its run folder) was built on: ``teacher.model`` of the
    stage that trained it here, else the ``model`` of the record beside an imported one; None
    when neither names it (a user's own model)."""
    from tfkd import io

    path = Path(teacher)
    folder, stage = (path, "teacher") if path.is_dir() else (path.parent, path.stem)
    try:
        model = load_records(folder).get(stage, {}).get("settings", {}).get("teacher.model")
        record = None if model or path.is_dir() else io.read_model_record(path)
    except Exception:  # a damaged record: the run itself reports it, with its fix
        return None
    return str(model) if model else (str(record["model"]) if record and record.get("model") else None)


def recorded_settings(run_dir: str | os.PathLike, stage: str) -> dict[str, Any] | None:
    """The settings ``stage`` was run with here: its ``run.json`` record, or for a folder from
    before ``run.json`` existed, its ``config.yaml`` flattened (None if neither is there)."""
    records = load_records(run_dir)
    if stage in records:
        return records[stage].get("settings", {})
    legacy = Path(run_dir) / "config.yaml"
    if not legacy.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(legacy.read_text()) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        raise ConfigError(f"{legacy}: damaged (not YAML); remove the run folder or choose another "
                          "--run-dir") from None

    def walk(node: Any, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in (node.items() if isinstance(node, dict) else []):
            out.update(walk(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    flat = walk(data)
    flat.pop("distill.teachers", None)  # paths there, not contents: not comparable
    return flat


#: Options added since runs were recorded whose default is not what those runs did: a record
#: that holds the option's section (``student.optimizer.*``) but not the key is compared as
#: holding this value (by the key's ending), so that a changed default never resumes or reuses
#: such a run as if nothing had changed.
BEFORE_THE_OPTION = {"optimizer.weight_decay_mode": "decoupled", "optimizer.nesterov": True}


def differences(recorded: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """``key: then -> now`` for every setting whose recorded value differs from ``now`` (keys the
    record lacks, options added since, are not compared, except those of ``BEFORE_THE_OPTION``)."""
    if recorded is None:
        return []
    found = []
    absent = object()
    for key in sorted(now):
        then = recorded.get(key, absent)
        section = key.rsplit(".", 1)[0] + "."
        if then is absent and any(k.startswith(section) for k in recorded):  # recorded before the option
            then = next((v for end, v in BEFORE_THE_OPTION.items() if key.endswith(end)), absent)
        if then is not absent and not _same(then, now[key]):
            found.append(f"{key}: {_show(then)} there, {_show(now[key])} now")
    return found


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _show(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(v, str) and len(v) == 64 for v in value):
        return "teachers " + ", ".join(v[:12] for v in value)
    return repr(value)


def dataset_differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Why ``dataset.json`` ``recorded`` describes another dataset than ``now`` (empty: the same).
    The normalization moves with the split's seed (a few per cent of the std on a small subset);
    beyond 5% of the std it is other data."""
    found = []
    if not str(recorded.get("dataset", "")).startswith("folder:") and recorded.get("dataset") != now.get("dataset"):
        found.append(f"dataset {recorded.get('dataset')!r} there, {now.get('dataset')!r} now")
    for key in DATASET_FIELDS:
        if key in recorded and recorded[key] != now.get(key):
            shown = (f"{len(recorded[key])} classes" if key == "class_names" else recorded[key],
                     f"{len(now.get(key) or [])} classes" if key == "class_names" else now.get(key))
            if key == "class_names" and len(recorded[key]) == len(now.get(key) or []):
                shown = (recorded[key][:3], (now.get(key) or [])[:3])
            found.append(f"{key} {shown[0]} there, {shown[1]} now")
    try:
        std = max(float(s) for s in now.get("std", [1.0]))
        for key in ("mean", "std"):
            if key in recorded and max(abs(float(a) - float(b)) for a, b in zip(recorded[key], now[key])) > 0.05 * std:
                found.append(f"normalization {key} {[round(float(v), 2) for v in recorded[key]]} there, "
                             f"{[round(float(v), 2) for v in now[key]]} now")
    except (TypeError, ValueError, KeyError):
        found.append("normalization unreadable there")
    return found


def read_dataset_record(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``dataset.json`` of a run folder (None when absent). Raises ``ConfigError`` when damaged."""
    path = Path(run_dir) / "dataset.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError
        return data
    except (OSError, ValueError):
        raise ConfigError(f"{path}: damaged (it should hold the JSON record of the run's data that "
                          "tfkd writes); move it aside (the trained models stay) and run the same "
                          "tfkd.train command on the same data: it writes the record again") from None
