"""Atomic file writes: every artifact is written to a temporary path beside it, then renamed.

A reader therefore sees either the previous complete file or the new complete one, never a
half-written file, even if the process is killed mid-write.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path in ``path``'s directory; renames it onto ``path`` on success.

    The temporary name keeps the final name as its suffix (``.tmp-<pid>-teacher.keras``) so
    libraries that check extensions accept it. On error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically writes ``text`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Atomically writes ``data`` as indented JSON."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_keras(path: str | os.PathLike, default_name: str, what: str) -> tuple[Any, Path]:
    """Loads a ``.keras`` file (or ``default_name`` inside a run folder) in Keras's safe mode,
    which refuses to run code stored in the file; returns the model and the file's path.

    Raises ``ModelError`` naming the file and what tfkd needs instead when it is missing, a
    SavedModel folder, a subclassed model's file, damaged, or cannot be loaded.
    """
    import zipfile

    import keras

    from tfkd.errors import ModelError

    path = Path(path)
    accepted = ("tfkd reads a functional Keras model saved as a .keras file (model.save('x.keras'); "
                "a subclassed model: rebuild it as keras.Model(inputs, outputs) first), or a run "
                "folder that holds one")
    if path.is_dir():
        if not (path / default_name).is_file() and (path / "saved_model.pb").is_file():
            raise ModelError(f"{path}: a SavedModel folder, which has no Keras layers to read: {accepted}")
        if not (path / default_name).is_file():
            raise ModelError(f"{path}: no {default_name} in this folder: {accepted}")
        path = path / default_name
    if not path.is_file():
        raise ModelError(f"{path}: {what} file not found")
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path}: damaged or not a .keras file (a .keras file is a zip archive; this "
                         "one is cut short or of another format): save the model again")
    try:
        return keras.saving.load_model(path, safe_mode=True), path
    except Exception as error:  # Keras raises many types for a corrupt or foreign file
        first_line = str(error).splitlines()[0][:200] if str(error) else ""
        if "Could not locate class" in first_line:
            name = first_line.split("'")[1] if first_line.count("'") >= 2 else "?"
            raise ModelError(f"{path}: a subclassed model (class {name!r}), whose layer graph "
                             f"tfkd cannot read: {accepted}") from None
        raise ModelError(f"{path}: not a loadable Keras model ({type(error).__name__}"
                         f"{': ' + first_line if first_line else ''})") from None


def model_record_path(model_path: str | os.PathLike) -> Path:
    """The record beside a model that tfkd did not train in a run folder (an imported one):
    ``<model>.json``, with its class names and input convention."""
    return Path(model_path).with_suffix(".json")


def read_model_record(model_path: str | os.PathLike) -> dict[str, Any] | None:
    """``<model>.json`` beside ``model_path`` (None when absent); ``ModelError`` when damaged."""
    from tfkd.errors import ModelError

    path = model_record_path(model_path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError
        return record
    except (OSError, ValueError):
        raise ModelError(f"{path}: damaged model record (expected the JSON tfkd writes)") from None
