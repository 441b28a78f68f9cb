"""tfkd.deploy_bench: the deployment benchmark's steps, cache and report, on a tiny protocol."""

import json
import os
import subprocess
import sys

import pytest

from tfkd.deploy_bench import folder_name
from tfkd.protocol import portable

TINY = """
description: a tiny deployment protocol
dataset: digits
epochs: 1
batch_size: 64
seeds: [0]
students: [resnet8]
teachers:
  rec: {model: resnet8}
runs:
  student: {method: student}
  cft: {method: cft, teachers: [rec]}
"""


def test_the_report_names_no_folder_of_this_machine():
    argv = ["deploy", "--data-dir", "/home/me/cifar", "--out=x", "--out", "/tmp/o", "--protocol", "/tmp/p.yaml"]
    assert portable(argv) == ["deploy", "--data-dir", "path/to/cifar-10-batches-py", "--out=x", "--out",
                              "path/to/out", "--protocol", "path/to/protocol.yaml"]
    # a folder in the repository (the README's --out benchmarks/results/...) stays as written
    assert portable(["--out", "benchmarks/results/x", "--data-dir", "/d/cifar-100-python"]) == \
        ["--out", "benchmarks/results/x", "--data-dir", "path/to/cifar-100-python"]
    assert folder_name("keras:MobileNetV3Small/cft") == "keras_MobileNetV3Small__cft"


@pytest.mark.slow
def test_deploy_trains_exports_times_and_reports_then_caches(tmp_path):
    protocol = tmp_path / "tiny.yaml"
    protocol.write_text(TINY)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tfkd.bench", "deploy", "--protocol", str(protocol), "--out", str(out),
               "--formats", "fp32,int8,onnx_int8", "--qat-epochs", "0", "--timing-runs", "5",
               "--max-test-images", "60", "--latency-runs", "3"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    first = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["students"]) == {"student", "cft"} and (out / "training.json").is_file()
    for name, student in results["students"].items():
        card = json.loads((out / "exports" / name / "model_card.json").read_text())
        assert student["fp32_top1"] == card["keras"]["top1"]
        assert set(student["formats"]) == {"fp32", "int8", "onnx_int8"}
        for fmt, row in student["formats"].items():
            entry = card["formats"][fmt]
            assert row["top1"] == entry["top1"] and row["int_ops"] == entry["ops"]["int_ops"]
            assert row["drop_pt"] == pytest.approx((card["keras"]["top1"] - entry["top1"]) * 100)
            assert row["latency_ms"] > 0 and (row["latency_ms_no_xnnpack"] is None) == fmt.startswith("onnx")
        assert student["formats"]["int8"]["float_ops"] == 0 and student["formats"]["fp32"]["int_ops"] == 0
    assert "path/to/out" in results["command"] and str(tmp_path) not in results["command"]
    assert "| int8 |" in (out / "results.md").read_text() and (out / "results.png").stat().st_size > 10_000
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and "tfkd.bench: export" not in again.stdout, "every step is cached"
    assert "3 of 3 runs cached" in again.stdout
