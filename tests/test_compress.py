"""tfkd.compress runs in its own process (tfmot switches a process to Keras 2), so do its tests."""

import os
import subprocess
import sys



def compress(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "tfkd.compress", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


# The qat and prune runs themselves, with what their reports must hold, are the README's two
# compress commands (tests/test_readme.py).


def test_compress_refuses_a_teacher(student_run, tmp_path):
    from tfkd import models
    from tfkd.teacher import ReconstructionTeacher

    ReconstructionTeacher(models.get("resnet8", 10)).save(tmp_path / "teacher.keras")
    result = compress(tmp_path / "teacher.keras", "--out", tmp_path / "o")
    assert result.returncode == 4 and "this is a teacher" in result.stderr
    assert not (tmp_path / "o").exists()
