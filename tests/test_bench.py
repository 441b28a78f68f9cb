"""``python -m tfkd.bench speed``: what it measures, the ratios it derives, the report it writes."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_speed_writes_rates_ratios_and_provenance(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tfkd.bench", "speed", "--methods", "student", "kd", "cft",
         "--steps", "2", "--repeats", "1", "--pipeline-batches", "3", "--dataset", "digits",
         "--latency-runs", "0", "--out", str(tmp_path / "speed")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "speed/speed.json").read_text())
    rates = report["training_images_per_second"]
    assert set(rates) == {"keras_distiller_kd", "student", "kd", "cft", "input_pipeline"}
    assert all(rate > 0 for rate in rates.values())
    for name, rate in rates.items():  # ratios are of the printed rates, rounded to 3 places
        assert report["training_ratio_to_keras_distiller_kd"][name] == pytest.approx(
            rate / rates["keras_distiller_kd"], abs=6e-4)
        assert report["training_ratio_to_student_alone"][name] == pytest.approx(
            rate / rates["student"], abs=6e-4)
    assert report["command"].startswith("python -m tfkd.bench speed --methods student kd cft")
    assert report["machine"]["cpu_count"] == os.cpu_count() and len(report["git_commit"]) == 40
    table = (tmp_path / "speed/speed.md").read_text()
    cft = report["training_images_per_second"]["cft"]
    assert f"| `cft` | {cft:,.1f} | {report['training_ratio_to_keras_distiller_kd']['cft']:.3f} |" in table
    assert "| `keras.distillation.Distiller` KD |" in table and "1.000 | " in table
