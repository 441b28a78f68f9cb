"""tfkd.recipes: ``--recipe`` presets the authors' training under everything the user gives."""

import json

import pytest

from tfkd import arguments, callbacks, config
from tfkd.errors import ConfigError

RECIPE = ["--recipe", "mdistiller-cifar100", "--dataset", "cifar100"]


def _config(*argv):
    return arguments.config_from_argv([*RECIPE, *argv])


def test_mdistiller_cifar100_is_mdistillers_schedule():
    cfg = _config("--teacher-model", "resnet56", "--student-model", "resnet20", "--method", "dkd")
    assert cfg.recipe == "mdistiller-cifar100" and cfg.data.batch_size == 64 and cfg.data.test_every_epoch
    for section in (cfg.teacher, cfg.student):
        opt = section.optimizer
        assert section.epochs == 240
        # 0.05 at batch 64: tfkd's rates are written at batch 128 and scaled linearly
        assert opt.learning_rate * cfg.data.batch_size / 128 == pytest.approx(0.05)
        assert (opt.momentum, opt.nesterov, opt.weight_decay, opt.weight_decay_mode) == (0.9, False, 5e-4, "coupled")
        assert (opt.schedule, list(opt.milestones), opt.decay_rate) == ("step", [150, 180, 210], 0.1)
    assert cfg.distill.dkd.beta == 2.0  # configs/cifar100/dkd/res56_res20.yaml


@pytest.mark.parametrize("teacher, student, beta, rate", [
    ("resnet110", "resnet32", 2.0, 0.05), ("resnet32x4", "resnet8x4", 8.0, 0.05),
    ("vgg13", "vgg8", 6.0, 0.05), ("wrn_40_2", "wrn_16_2", 6.0, 0.05), ("vgg13", "mobilenetv2", 6.0, 0.01)])
def test_the_pairs_settings(teacher, student, beta, rate):
    cfg = _config("--teacher-model", teacher, "--student-model", student, "--method", "dkd")
    assert cfg.distill.dkd.beta == beta
    assert cfg.student.optimizer.learning_rate * 64 / 128 == pytest.approx(rate)


def test_what_the_user_gives_wins_over_the_recipe(tmp_path):
    (tmp_path / "my.yaml").write_text("student:\n  optimizer:\n    momentum: 0.8\n")
    cfg = _config("--teacher-model", "resnet56", "--student-model", "resnet20", "--method", "dkd",
                  "--epochs", "3", "--set", "distill.dkd.beta=4", "--batch-size", "32",
                  "--config", str(tmp_path / "my.yaml"))
    assert (cfg.student.epochs, cfg.teacher.epochs, cfg.distill.dkd.beta, cfg.data.batch_size) == (3, 3, 4.0, 32)
    assert cfg.student.optimizer.momentum == 0.8 and cfg.student.optimizer.nesterov is False


def test_no_recipe_leaves_the_defaults():
    plain = config.load()
    assert plain.recipe == "" and plain.data.batch_size == 128 and not plain.data.test_every_epoch
    assert plain.student.optimizer.nesterov is True


def test_an_unknown_recipe_is_named():
    with pytest.raises(ConfigError, match="option 'recipe' = 'nope': expected one of mdistiller-cifar100"):
        config.load(overrides={"recipe": "nope"})


def test_best_epoch_reads_the_log_across_a_resume(tmp_path):
    log = tmp_path / "distill_log.csv"
    log.write_text("epoch,accuracy,test_accuracy\n0,0.1,0.30\n1,0.2,0.52\n1,0.2,0.41\n2,0.3,0.50\n")
    assert callbacks.best_epoch(log) == {"epoch": 2, "test_accuracy": 0.50}  # epoch 1's last row: 0.41
    assert callbacks.best_epoch(tmp_path / "none.csv") is None


def test_a_run_that_tests_every_epoch_reports_its_best_and_its_last(tmp_path):
    from tfkd import train

    run_dir = tmp_path / "run"
    assert train.main(["--stage", "distill", "--method", "student", "--student-model", "resnet8",
                       "--epochs", "3", "--batch-size", "64", "--run-dir", str(run_dir), "--set", "progress=0",
                       "--set", "data.test_every_epoch=true"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())["stages"]["distill"]
    rows = (run_dir / "distill_log.csv").read_text().splitlines()
    header = rows[0].split(",")
    per_epoch = [float(r.split(",")[header.index("test_accuracy")]) for r in rows[1:]]
    assert len(per_epoch) == 3
    assert metrics["best_epoch_test_accuracy"] == max(per_epoch)
    assert metrics["best_epoch"] == per_epoch.index(max(per_epoch)) + 1
    assert 0 <= metrics["test_accuracy"] <= 1  # the last epoch's, after precise batch norm


def test_a_distill_run_takes_its_pair_from_the_teacher_it_is_given(tmp_path):
    """``--teacher FILE``: the recipe's pair is the model that file was trained (or imported) as,
    not the ``teacher.model`` default."""
    from tfkd import io, rundir

    trained = tmp_path / "t32x4"
    trained.mkdir()
    rundir.write_record(trained, "teacher", {"teacher.model": "resnet32x4"}, "done", "teacher.keras")
    imported = tmp_path / "resnet56.keras"
    io.write_json(io.model_record_path(imported), {"model": "resnet56a"})
    cases = [(trained / "teacher.keras", 8.0), (trained, 8.0), (imported, 2.0)]
    for teacher, beta in cases:
        cfg = _config("--teacher", str(teacher), "--student-model", "resnet8x4" if beta == 8.0 else "resnet20",
                      "--method", "dkd")
        assert cfg.distill.dkd.beta == beta, teacher
    # a user's own model names no backbone: teacher.model decides (resnet20 -> resnet8x4: the default 8)
    cfg = _config("--teacher", str(tmp_path / "mine.keras"), "--teacher-model", "vgg13",
                  "--student-model", "vgg8", "--method", "dkd")
    assert cfg.distill.dkd.beta == 6.0
