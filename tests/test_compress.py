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


def test_compress_refuses_a_teacher(tmp_path):
    from tfkd import models
    from tfkd.teacher import ReconstructionTeacher

    ReconstructionTeacher(models.get("resnet8", 10)).save(tmp_path / "teacher.keras")
    result = compress(tmp_path / "teacher.keras", "--out", tmp_path / "o")
    assert result.returncode == 4 and "this is a teacher" in result.stderr
    assert not (tmp_path / "o").exists()


def test_compress_rebuilds_a_keras_applications_student_and_quantizes_it(tmp_path, digits):
    """A keras:MobileNetV3Small student (Rescaling and hard-swish Multiply inside, which
    TensorFlow Model Optimization cannot wrap) is rebuilt with tf_keras's copy of the network,
    agrees with the Keras 3 model, and comes out of QAT and pruning as a verified int8 model."""
    import json

    import keras

    from conftest import write_student_run
    from tfkd import models

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    keras.utils.set_random_seed(0)
    info = digits.info()
    student = models.get("keras:MobileNetV3Small", 10, (32, 32, 3), normalization=(info["mean"], info["std"]))
    for layer in student._flatten_layers():  # moving statistics that keep up with 150 steps
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    write_student_run(run_dir, student, digits, keras.optimizers.Adam(2e-3), epochs=6)
    for method, left, options in (("qat", {"Rescaling", "Multiply"}, ["--epochs", "1"]),
                                  ("prune", {"BatchNormalization"}, ["--epochs", "1", "--sparsity", "0.3"])):
        result = compress(run_dir, "--out", tmp_path / method, "--method", method, *options,
                          "--learning-rate", "0.002", "--max-test-images", "200")
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads((tmp_path / method / "compress_report.json").read_text())
        assert report["parity_max_abs_logit_diff"] <= report["parity_allowed"]
        assert left <= set(report["not_wrapped_layer_kinds"])
        assert (tmp_path / method / "model_int8.tflite").stat().st_size == report["compressed_int8"]["bytes"]
        assert report["compressed_int8"]["bytes"] < 0.5 * report["fp32_tflite"]["bytes"]
        assert report["test_images"] == 200 and report["float_keras_top1"] > 0.8
        assert report["compressed_int8"]["top1"] >= report["float_keras_top1"] - 0.10
        drop = (report["val_top1"]["float"] - report["val_top1"]["compressed"]) * 100
        assert report["val_drop_pt"] == drop and report["within_budget"] == (drop <= report["max_drop_pt"] == 1.0)
        assert len(report["warnings"]) == (0 if report["within_budget"] else 1)
    assert 0.2 < report["sparsity"] < 0.4


def test_compress_names_what_it_cannot_rebuild():
    import keras
    import pytest

    from tfkd.compress import rebuild_as_tf_keras
    from tfkd.errors import ModelError

    images = keras.Input((32, 32, 3))
    other = keras.Model(images, {"logits": keras.layers.Dense(10)(keras.layers.Flatten()(images))},
                        name="keras_hub_resnet_18_imagenet")
    with pytest.raises(ModelError, match="'keras_hub_resnet_18_imagenet': compress rebuilds zoo models and "
                                         "keras:NAME networks"):
        rebuild_as_tf_keras(other, (32, 32, 3), 10)
