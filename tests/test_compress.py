"""tfkd.compress runs in its own process (tfmot switches a process to Keras 2), so do its tests."""

import json
import os
import subprocess
import sys

import pytest


def compress(*args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "tfkd.compress", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.mark.parametrize("method", ["qat", "prune"])
def test_compress_writes_a_verified_int8_model(student_run, tmp_path, method):
    out = tmp_path / method
    result = compress(student_run, "--out", out, "--method", method, "--epochs", "2", "--batch-size", "64",
                      "--max-test-images", "120")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "compress_report.json").read_text())
    assert report["parity_max_abs_logit_diff"] <= 1e-5  # the tf_keras rebuild equals the student
    assert (out / "model_int8.tflite").stat().st_size == report["compressed_int8"]["bytes"]
    assert report["compressed_int8"]["bytes"] < 0.5 * report["fp32_tflite"]["bytes"]
    assert 0.0 <= report["compressed_int8"]["top1"] <= 1.0 and report["test_images"] == 120
    if method == "prune":
        assert report["sparsity"] == pytest.approx(0.5, abs=0.02)
        assert report["compressed_int8"]["gzip_bytes"] < report["post_training_int8"]["gzip_bytes"]
    assert f"{method}: int8 top-1" in result.stdout


def test_compress_refuses_a_teacher(student_run, tmp_path):
    from tfkd import models
    from tfkd.teacher import ReconstructionTeacher

    ReconstructionTeacher(models.get("resnet8", 10)).save(tmp_path / "teacher.keras")
    result = compress(tmp_path / "teacher.keras", "--out", tmp_path / "o")
    assert result.returncode == 4 and "this is a teacher" in result.stderr
    assert not (tmp_path / "o").exists()
