"""tfkd.io: loading a user's model says what is wrong with it and what tfkd needs instead;
tfkd.rundir's damaged-record message keeps the user's run."""

import json

import keras
import numpy as np
import pytest

from tfkd import io, rundir
from tfkd.errors import ConfigError, ModelError

NEEDS = "tfkd reads a functional Keras model saved as a .keras file"


def _functional():
    images = keras.Input((8, 8, 3))
    return keras.Model(images, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(images)))


class _Subclassed(keras.Model):  # not registered: what a user's own class looks like to a loader
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.head = keras.layers.Dense(3)

    def call(self, x):
        return self.head(keras.ops.mean(x, axis=(1, 2)))


def test_a_users_model_file_gets_the_message_of_what_it_is(tmp_path):
    model = _functional()
    model.save(tmp_path / "good.keras")
    data = (tmp_path / "good.keras").read_bytes()
    (tmp_path / "cut.keras").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.keras").write_text("not a model\n")
    sub = _Subclassed()
    sub(np.zeros((1, 8, 8, 3), np.float32))
    sub.save(tmp_path / "sub.keras")
    model.export(str(tmp_path / "exported"), verbose=False)  # a SavedModel folder
    (tmp_path / "empty").mkdir()
    cases = [("cut.keras", "damaged or not a .keras file (a .keras file is a zip archive; this one is cut short"),
             ("text.keras", "damaged or not a .keras file"),
             ("sub.keras", f"a subclassed model (class '_Subclassed'), whose layer graph tfkd cannot read: {NEEDS}"),
             ("exported", f"a SavedModel folder, which has no Keras layers to read: {NEEDS}"),
             ("empty", f"no teacher.keras in this folder: {NEEDS}"),
             ("missing.keras", "missing.keras: teacher file not found")]
    for name, message in cases:
        before = sorted(p.name for p in tmp_path.rglob("*"))
        with pytest.raises(ModelError) as raised:
            io.load_keras(tmp_path / name, "teacher.keras", "teacher")
        assert str(raised.value).startswith(str(tmp_path / name)), name
        assert message in str(raised.value) and "\n" not in str(raised.value), (name, str(raised.value))
        assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written or removed
    loaded, path = io.load_keras(tmp_path / "good.keras", "teacher.keras", "teacher")
    assert path == tmp_path / "good.keras" and loaded.count_params() == model.count_params() == 12


def test_a_damaged_dataset_record_is_explained_with_a_fix_that_keeps_the_run(tmp_path):
    (tmp_path / "dataset.json").write_text('{"classes": [')
    with pytest.raises(ConfigError, match="dataset.json: damaged .*move it aside \\(the trained models stay\\)"):
        rundir.read_dataset_record(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"num_classes": 3}))
    assert rundir.read_dataset_record(tmp_path) == {"num_classes": 3}
