"""Accuracy protocols: parsing, the jobs they expand to, the report's arithmetic, and a tiny
protocol run end to end through ``python -m tfkd.bench accuracy`` with its cache."""

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tfkd import protocol as protocol_lib
from tfkd.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

TINY = """
dataset: digits
epochs: 1
batch_size: 64
seeds: [0]
student: resnet8
set: {data.validation_fraction: 0.2}
teachers:
  rec: {model: resnet8, set: {teacher.lambda_rec: 1.0}}
runs:
  student: {method: student}
  kd: {method: kd, teachers: [rec]}
"""


def test_shipped_cifar10_protocol_expands_to_teachers_then_every_method(tmp_path):
    protocol = protocol_lib.load("cifar10-cpu")
    assert (protocol.dataset, protocol.epochs, protocol.batch_size, protocol.student) == \
        ("cifar10", 20, 128, "resnet8")
    assert list(protocol.runs) == ["student", "kd", "fitnet", "at", "cft", "mktn", "cft-no-adv",
                                   "cft-no-feat", "cft-plain-teacher", "dkd", "dist", "kd-ls", "dkd-ls",
                                   "ofd", "reviewkd", "crd"]
    jobs = protocol_lib.jobs(protocol, tmp_path, "/data", seeds=[0, 1])
    kinds = [(j.kind, j.name, j.seed) for j in jobs]
    assert kinds[:3] == [("teacher", "rec", 0), ("teacher", "plain", 0), ("teacher", "autoencoder", 0)]
    assert len(jobs) == 3 + 16 * 2
    default = protocol_lib.jobs(protocol, tmp_path, "/data")  # the headline trio: three seeds
    assert {(j.name, j.seed) for j in default if j.seed} == {(n, s) for n in ("student", "kd", "cft")
                                                             for s in (1, 2)}
    assert len(default) == 3 + 16 + 3 * 2
    kd_ls = next(j for j in default if j.name == "kd-ls")
    assert kd_ls.args[kd_ls.args.index("--method") + 1] == "kd+ls"
    mktn = next(j for j in jobs if j.name == "mktn")
    teachers = [mktn.args[i + 1] for i, a in enumerate(mktn.args) if a == "--teacher"]
    assert teachers == [str(tmp_path / "runs/teachers/autoencoder/teacher.keras"),
                        str(tmp_path / "runs/teachers/plain/teacher.keras")]
    no_adv = next(j for j in jobs if j.name == "cft-no-adv")
    assert "distill.cft.beta=0.0" in no_adv.args and "--data-dir" in no_adv.args
    assert no_adv.args[no_adv.args.index("--epochs") + 1] == "20"


def test_shipped_cifar100_protocol_resolves_to_a_valid_run_config(tmp_path):
    from tfkd import arguments

    protocol = protocol_lib.load("cifar100-full")
    jobs = protocol_lib.jobs(protocol, tmp_path, None)
    cfg = arguments.config_from_argv(jobs[-1].args)
    assert (cfg.data.dataset, cfg.data.batch_size, cfg.student.epochs, cfg.student.model) == \
        ("cifar100", 64, 240, "resnet20")
    assert cfg.student.optimizer.schedule == "step"
    assert list(cfg.student.optimizer.milestones) == [150, 180, 210]


def _configs(name: str, tmp_path: Path) -> dict:
    """Each non-import job of a shipped protocol as its resolved run config, by (run, student, seed)."""
    from tfkd import arguments

    jobs = protocol_lib.jobs(protocol_lib.load(name), tmp_path, "/data", teachers_dir="/teachers")
    return {(j.run or j.name, j.student, j.seed): arguments.config_from_argv(j.args)
            for j in jobs if j.kind != "import"}


@pytest.mark.parametrize("name", protocol_lib.shipped())
def test_every_shipped_protocol_expands_to_valid_run_configs(name, tmp_path):
    assert _configs(name, tmp_path)


def test_shipped_protocols_are_listed():
    assert {"cifar10-anchor", "cifar10-cpu", "cifar10-mobile", "cifar100-full"} <= set(protocol_lib.shipped())


def test_anchor_protocol_gives_cfts_tuned_ce_weight_to_its_one_part_ablations_only(tmp_path):
    configs = _configs("cifar10-anchor", tmp_path)
    cft = {run: configs[(run, "resnet8", 0)].distill.cft for run in
           ("cft", "cft-no-adv", "cft-no-feat", "cft-plain-teacher", "cft-gamma0")}
    assert [c.ce_weight for c in cft.values()] == [0.1, 0.1, 0.1, 0.1, 1.0]  # gamma0: the papers' form
    assert (cft["cft-no-adv"].beta, cft["cft-no-feat"].alpha, cft["cft-gamma0"].gamma) == (0.0, 0.0, 0.0)
    assert (cft["cft"].beta, cft["cft"].alpha, cft["cft"].gamma) == (0.1, 1.0, 0.9)


def test_anchor_protocol_scales_dkds_warmup_to_its_schedule(tmp_path):
    """mdistiller's 20 of 240 epochs, at 8 epochs: 2/3 of the first epoch, so it ramps by step."""
    dkd = _configs("cifar10-anchor", tmp_path)[("dkd", "resnet8", 0)]
    assert dkd.distill.dkd.warmup_epochs == pytest.approx(20 / 240 * dkd.student.epochs, abs=1e-3)
    assert dkd.student.epochs == 8
    assert dkd.distill.dkd.beta == 2.0  # the authors' beta for a resnet56 teacher (8: resnet32x4)


@pytest.mark.parametrize("text, match", [
    ("dataset: digits\nepochs: 1\nstudent: resnet8\nteachers: {}\nruns: {student: {method: student}}\n"
     "colour: red\n", "unknown key 'colour'"),
    ("dataset: digits\nepochs: 1\nstudent: resnet8\nteachers: {}\nruns: {kd: {method: kd}}\n",
     "kd takes 1 teacher"),
    ("dataset: digits\nepochs: 1\nstudent: resnet8\nteachers: {}\nruns: {a: {method: magic}}\n",
     "method 'magic'"),
    ("dataset: digits\nepochs: 1\nstudent: resnet8\nteachers: {}\nruns: {kd: {method: kd, teachers: [x]}}\n",
     "teacher 'x' is not in teachers"),
    ("dataset: digits\nepochs: 0\nstudent: resnet8\nteachers: {}\nruns: {student: {method: student}}\n",
     "epochs: expected a positive integer"),
    ("dataset: digits\nepochs: 1\nstudent: resnet8\nteachers: {}\nruns: {}\n", "named 'student'"),
    ("dataset: digits\nstudent: resnet8\n", "missing key 'epochs'"),
    ("[1, 2", "not valid YAML"),
    ("dataset: digits\nepochs: 1\nstudent: resnet8\nteachers: {}\nruns:\n  student: {method: student}\n"
     "  kd: {method: student}\n  student: {method: kd}\n", r"key 'student' is written twice .*lines 6 and 8"),
])
def test_bad_protocols_fail_with_the_file_and_key(tmp_path, text, match):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as error:
        protocol_lib.load(str(path))
    assert str(path) in str(error.value)


def test_unknown_protocol_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="cifar10-cpu"):
        protocol_lib.load("cifar11")


def _fake_run(run_dir: Path, kind: str, commit: str | None = None, **metrics) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / ("teacher.keras" if kind == "teacher" else "student.keras")).write_bytes(b"x")
    stage = "teacher" if kind == "teacher" else "distill"
    (run_dir / "metrics.json").write_text(json.dumps({"stages": {stage: metrics}}))
    if commit:  # the run.json record of the code that made it (no settings: none compared)
        (run_dir / "run.json").write_text(json.dumps(
            {"format": 1, "stages": {stage: {"status": "done", "settings": {}, "commit": commit}}}))


def _timed_launch(log, fail=()):
    """A stand-in for a run's process: sleeps, records its start and end, writes its result."""
    import threading
    import time

    lock = threading.Lock()

    def launch(job):
        with lock:
            log.append(("start", job.name, time.monotonic()))
        if job.name in fail:  # at once, while the other job still runs
            raise protocol_lib.TrainingError(f"{job.name} failed")
        time.sleep(0.15)
        with lock:
            log.append(("end", job.name, time.monotonic()))
        _fake_run(job.run_dir, job.kind, test_accuracy=0.5)
    return launch


def _dag(tmp_path):
    def job(name, kind, *needs):
        return protocol_lib.Job(kind, name, 0, tmp_path / name, [], needs=tuple(tmp_path / n for n in needs))
    return [job("plain", "teacher"), job("rec", "teacher", "plain"), job("cft", "student", "rec"),
            job("kd", "student", "plain"), job("alone", "student"), job("kd2", "student", "plain")]


def test_parallel_runs_start_once_their_teachers_end_and_never_exceed_the_limit(tmp_path):
    log = []
    protocol_lib.execute(_dag(tmp_path), _timed_launch(log), parallel=2)
    start = {name: t for kind, name, t in log if kind == "start"}
    end = {name: t for kind, name, t in log if kind == "end"}
    assert set(end) == {"plain", "rec", "cft", "kd", "alone", "kd2"}
    for name, needs in (("rec", "plain"), ("cft", "rec"), ("kd", "plain"), ("kd2", "plain")):
        assert start[name] >= end[needs], name
    running, peak = 0, 0
    for kind, _, _ in sorted(log, key=lambda e: (e[2], e[0] == "start")):
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak == 2
    first_two = sorted((t, name) for kind, name, t in log if kind == "start")[:2]
    assert {name for _, name in first_two} == {"plain", "alone"}  # the ready ones, in order


def test_after_a_parallel_failure_the_running_jobs_finish_and_no_new_one_starts(tmp_path):
    log = []
    with pytest.raises(protocol_lib.TrainingError, match="alone failed"):
        protocol_lib.execute(_dag(tmp_path), _timed_launch(log, fail=("alone",)), parallel=2)
    started = {name for kind, name, _ in log if kind == "start"}
    assert started == {"plain", "alone"}  # rec could start after plain, but alone had failed
    assert (tmp_path / "plain" / "metrics.json").is_file()


def test_report_means_stds_and_gains_over_the_student(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(TINY.replace("seeds: [0]", "seeds: [0, 1]"))
    protocol = protocol_lib.load(str(path))
    jobs = protocol_lib.jobs(protocol, tmp_path / "out", None)
    _fake_run(jobs[0].run_dir, "teacher", "a" * 40, test_accuracy=0.9, val_accuracy=0.89, test_psnr=20.0,
              model="resnet8", lambda_cls=1.0, lambda_rec=1.0, wall_seconds=3600.0)
    for job, (val, test), commit in zip(jobs[1:], [(0.70, 0.80), (0.72, 0.82), (0.75, 0.83), (0.77, 0.87)],
                                        ["b" * 40, "b" * 40, None, "b" * 40]):
        _fake_run(job.run_dir, "student", commit, val_accuracy=val, test_accuracy=test, wall_seconds=5.0,
                  epochs_seconds=1800.0)
    results = protocol_lib.report(protocol, tmp_path / "out", jobs, "cmd")
    student, kd = results["runs"]["student"], results["runs"]["kd"]
    assert student["test"]["mean"] == pytest.approx(0.81)
    assert student["test"]["std"] == pytest.approx(0.0141421, abs=1e-6)  # sample std of .80, .82
    assert kd["test"]["mean"] == pytest.approx(0.85)
    assert kd["test"]["gain_over_student"] == pytest.approx(0.04)
    assert kd["val"]["gain_over_student"] == pytest.approx(0.05)
    assert results["complete"] and results["teachers"]["rec"]["test_accuracy"] == 0.9
    assert results["run_seconds"] == pytest.approx(3600 + 4 * 1800)  # epochs_seconds, else wall_seconds
    table = (tmp_path / "out/results.md").read_text()
    assert "Run time: 3.0 h" in table
    assert results["run_commits"] == {"a" * 40: 1, "b" * 40: 3, "unrecorded": 1}
    assert "Runs made by: `bbbbbbbbbb` (3 runs), `aaaaaaaaaa` (1 run), an unrecorded commit (1 run)" in table
    assert "| kd | kd | rec | — | 0, 1 | 76.00 ± 1.41 | 85.00 ± 2.83 | +4.00 |" in table
    assert (tmp_path / "out/results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_know_their_commit_in_a_checkout_and_in_a_git_archive_copy(tmp_path):
    """A protocol run from an exported copy (``git archive``, no .git) still records its commit."""
    import tarfile

    from tfkd import rundir

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    head = head.stdout.strip()
    assert rundir.code_commit() == head
    subprocess.run(["git", "archive", "-o", str(tmp_path / "copy.tar"), "HEAD", "tfkd"], cwd=REPO, check=True)
    with tarfile.open(tmp_path / "copy.tar") as tar:
        tar.extractall(tmp_path / "copy", filter="data")
    printed = subprocess.run([sys.executable, "-c", "from tfkd.rundir import code_commit; print(code_commit())"],
                             cwd=tmp_path / "copy", capture_output=True, text=True, check=True).stdout
    assert printed.strip() == head
    (tmp_path / "copy" / "tfkd" / "COMMIT").write_text("$Format:%H$\n")  # a copy not from git archive
    printed = subprocess.run([sys.executable, "-c", "from tfkd.rundir import code_commit; print(code_commit())"],
                             cwd=tmp_path / "copy", capture_output=True, text=True, check=True).stdout
    assert printed.strip() == "None"


def test_report_names_the_seeds_a_partial_row_comes_from(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(TINY.replace("seeds: [0]", "seeds: [0, 1, 2]"))
    protocol = protocol_lib.load(str(path))
    jobs = protocol_lib.jobs(protocol, tmp_path / "out", None)
    kd_jobs = [job for job in jobs if job.name == "kd"]
    for job, test in zip(kd_jobs[:2], [0.80, 0.84]):  # seed 2 has not run
        _fake_run(job.run_dir, "student", val_accuracy=test, test_accuracy=test)
    results = protocol_lib.report(protocol, tmp_path / "out", jobs, "cmd")
    assert results["runs"]["kd"]["test"]["n"] == 2 and not results["runs"]["kd"]["seeds"]["2"]["finished"]
    table = (tmp_path / "out/results.md").read_text()
    assert "| kd | kd | rec | — | 0, 1 (not finished: 2) | 82.00 ± 2.83 | 82.00 ± 2.83 | — |" in table
    assert "| student | student | — | — | — | — | — | — |" in table


def _correct(n: int, right: int) -> np.ndarray:
    """n images of which ``right`` are classified correctly, in a fixed shuffled order that every
    run shares (so a run with more right is a superset of one with fewer)."""
    return (np.arange(n) < right)[np.random.default_rng(0).permutation(n)]


def test_bootstrap_interval_of_a_paired_difference_is_the_normal_one():
    n = 10_000
    rng = np.random.default_rng(3)
    a = rng.random(n) < 0.85
    b = a.copy()
    b[rng.choice(np.flatnonzero(a), 500, replace=False)] = False  # b loses 500 images a gets
    b[rng.choice(np.flatnonzero(~a), 300, replace=False)] = True  # and wins 300 a misses
    seeds, boot = protocol_lib.bootstrap({"a": {0: a}, "b": {0: b}})
    assert seeds == [0] and boot["a"].shape == (protocol_lib.RESAMPLES,)
    assert boot["a"].mean() == pytest.approx(a.mean(), abs=1e-3)
    d = a.astype(float) - b
    se = d.std() / np.sqrt(n)  # the paired difference's standard error: about 0.28 pt here
    lo, hi = np.percentile(boot["a"] - boot["b"], [2.5, 97.5])
    assert (lo + hi) / 2 == pytest.approx(d.mean(), abs=0.2 * se)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.1)
    unpaired = np.sqrt(a.var() / n + b.var() / n)  # what ignoring the pairing would give: 1.8x wider
    assert hi - lo < 0.7 * 2 * 1.96 * unpaired


def test_bootstrap_draws_the_seeds_too():
    # seed 0: a beats b by 10 pt, seed 1: b beats a by 10 pt. Drawing images alone would give an
    # interval of about +-1 pt around 0; drawing seeds too, a quarter of the resamples are seed 0
    # twice (+10 pt) and a quarter seed 1 twice (-10 pt).
    correct = {"a": {0: _correct(2000, 1200), 1: _correct(2000, 1000)},
               "b": {0: _correct(2000, 1000), 1: _correct(2000, 1200)}}
    seeds, boot = protocol_lib.bootstrap(correct)
    diff = boot["a"] - boot["b"]
    assert seeds == [0, 1]
    assert np.percentile(diff, 2.5) == pytest.approx(-0.10, abs=0.01)
    assert np.percentile(diff, 97.5) == pytest.approx(0.10, abs=0.01)
    assert np.mean(np.abs(diff) > 0.08) == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="seed 0"):
        protocol_lib.bootstrap({"a": {0: np.ones(10, bool)}, "b": {0: np.ones(12, bool)}})


def test_report_pairs_runs_within_each_student_model_with_intervals_and_the_gain_ratio(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(TINY.replace("student: resnet8", "students: [resnet8, resnet14]")
                    + "  cft: {method: cft, teachers: [rec]}\n")
    protocol = protocol_lib.load(str(path))
    jobs = protocol_lib.jobs(protocol, tmp_path / "out", None)
    n = 1000
    right = {"resnet8": {"student": 800, "kd": 850, "cft": 900},  # cft/kd gain ratio 2.0
             "resnet14": {"student": 700, "kd": 800, "cft": 750}}  # 0.5
    labels = np.arange(n) % 10
    for job in jobs:
        if job.kind == "teacher":
            _fake_run(job.run_dir, "teacher", test_accuracy=0.9, val_accuracy=0.9)
            continue
        k = right[job.student][job.run]
        _fake_run(job.run_dir, "student", val_accuracy=k / n, test_accuracy=k / n)
        flags = _correct(n, k)
        np.savez(job.run_dir / "test_predictions.npz", labels=labels, predictions=np.where(flags, labels, labels + 1))
    results = protocol_lib.report(protocol, tmp_path / "out", jobs, "cmd")
    runs = results["runs"]
    assert sorted(runs) == sorted(f"{s}/{r}" for s in right for r in right[s])
    cft_vs_kd = runs["resnet8/cft"]["vs"]["kd"]
    assert cft_vs_kd["diff"] == pytest.approx(0.05) and cft_vs_kd["seeds"] == [0]
    se = np.sqrt(0.05 * 0.95 / n)  # the two runs differ on 5% of the images, all in cft's favour
    assert cft_vs_kd["ci"] == pytest.approx([0.05 - 1.96 * se, 0.05 + 1.96 * se], abs=0.004)
    assert runs["resnet14/cft"]["vs"]["kd"]["diff"] == pytest.approx(-0.05)  # paired within resnet14
    assert runs["resnet14/kd"]["vs"]["cft"]["diff"] == pytest.approx(0.05)
    assert "kd" not in runs["resnet8/kd"]["vs"]
    ratios = results["gain_ratio_intervals"]
    assert ratios["resnet8"]["value"] == pytest.approx(2.0) and ratios["resnet14"]["value"] == pytest.approx(0.5)
    lo, hi = ratios["resnet8"]["ci"]
    assert 1.3 < lo < 2.0 < hi < 3.2
    table = (tmp_path / "out/results.md").read_text()
    lo, hi = (100 * v for v in cft_vs_kd["ci"])
    assert f"| resnet8/cft | cft | rec | — | 0 | 90.00 | 90.00 | +10.00 | +5.00 [{lo:+.2f}, {hi:+.2f}] | — |" in table
    assert "resnet14: cft's gain over the student alone / kd's gain: 0.50x" in table


def test_a_run_may_have_seeds_of_its_own_and_the_command_line_wins(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(TINY.replace("kd: {method: kd, teachers: [rec]}",
                                 "kd: {method: kd, teachers: [rec], seeds: [0, 1, 2]}"))
    protocol = protocol_lib.load(str(path))
    jobs = protocol_lib.jobs(protocol, tmp_path, None)
    assert [(j.kind, j.name, j.seed) for j in jobs] == [
        ("teacher", "rec", 0), ("student", "student", 0), ("student", "kd", 0),
        ("student", "kd", 1), ("student", "kd", 2)]
    assert jobs[-1].run_dir == tmp_path / "runs/kd/seed2" and "--seed" in jobs[-1].args
    assert jobs[-1].args[jobs[-1].args.index("--seed") + 1] == "2"
    override = protocol_lib.jobs(protocol, tmp_path, None, seeds=[5, 6])
    assert [(j.name, j.seed) for j in override] == [("rec", 5), ("student", 5), ("student", 6),
                                                   ("kd", 5), ("kd", 6)]
    for bad in ("[]", "[0, 0]", "[a]"):
        path.write_text(TINY.replace("kd: {method: kd, teachers: [rec]}",
                                     f"kd: {{method: kd, teachers: [rec], seeds: {bad}}}"))
        with pytest.raises(ConfigError, match=r"runs.kd.seeds: expected a non-empty list of distinct"):
            protocol_lib.load(str(path))


def _record(job):
    """The run.json record tfkd.train writes when it runs ``job``."""
    from tfkd import rundir
    from tfkd.arguments import config_from_argv

    cfg = config_from_argv(job.args)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_record(job.run_dir, job.stage, rundir.stage_settings(cfg, job.stage), "done")


def test_a_changed_setting_never_reuses_a_cached_run(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(TINY)
    protocol = protocol_lib.load(str(path))
    job = protocol_lib.jobs(protocol, tmp_path / "out", None, only=["student"])[0]
    _record(job)
    assert job.changed_setting() is None
    changed = protocol_lib.jobs(protocol, tmp_path / "out", None, epochs=2, only=["student"])[0]
    with pytest.raises(ConfigError, match="other settings"):
        changed.done()


def test_a_changed_default_never_reuses_a_cached_run(tmp_path):
    """Same arguments, other settings: the run folder's config.yaml says what the run used, and
    only the settings a run reads count (a teacher reads no distill.*, kd no cft option)."""
    from tfkd import config as config_lib
    from tfkd.arguments import build_parser, config_from_args

    path = tmp_path / "p.yaml"
    path.write_text(TINY + "  cft: {method: cft, teachers: [rec]}\n")
    protocol = protocol_lib.load(str(path))
    teacher, _, kd, cft = protocol_lib.jobs(protocol, tmp_path / "out", None)

    def made_with(job, section="cft", **changes):  # the run folder as if made when those were the defaults
        cfg = config_from_args(build_parser().parse_args(job.args))
        for key, value in changes.items():
            setattr(getattr(cfg.distill, section), key, value)
        (job.run_dir / "config.yaml").write_text(config_lib.to_yaml(cfg))

    for job in (teacher, kd, cft):
        _fake_run(job.run_dir, job.kind, val_accuracy=0.5)
        made_with(job)
        assert job.changed_setting() is None and job.done()
        made_with(job, gamma=0.0)
    assert teacher.done() and kd.done()  # neither reads distill.gamma
    assert cft.changed_setting() == "distill.cft.gamma: 0.0 there, 0.9 now"
    with pytest.raises(ConfigError, match="distill.cft.gamma: 0.0 there, 0.9 now"):
        cft.done()
    made_with(kd, "kd", temperature=2.0)  # kd reads the temperature
    assert kd.changed_setting() == "distill.kd.temperature: 2.0 there, 4.0 now"
    import yaml

    saved = yaml.safe_load((cft.run_dir / "config.yaml").read_text())
    del saved["distill"]["cft"]["gamma"]
    (cft.run_dir / "config.yaml").write_text(yaml.safe_dump(saved))  # an option the run predates
    assert cft.done()  # is not compared


def test_every_distill_option_is_read_by_some_method():
    """Every method section of distill.* is read by its method: none would never invalidate a run."""
    import dataclasses

    from tfkd.config import DistillConfig
    from tfkd.distill.methods import METHODS, REGISTRY, reads_option

    usable = [m if REGISTRY[m].modify is None else f"kd+{m}" for m in METHODS]  # a modifier follows one
    for option in (f.name for f in dataclasses.fields(DistillConfig)):
        assert any(reads_option(m, option) for m in usable), option
    assert reads_option("cft", "cft.discriminator.learning_rate") and reads_option("cft+dkd", "dkd.beta")
    assert not reads_option("kd", "cft.discriminator.learning_rate") and not reads_option("student", "kd.temperature")


def _bench(args, cwd):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "tfkd.bench", "accuracy", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def test_report_only_on_unfinished_runs_marks_them_and_records_the_training_command(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    result = _bench(["--protocol", str(path), "--out", "out", "--report-only"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "out/results.md").read_text()
    assert "**Incomplete**" in table and "| rec | — | — | — | — | — | — |" in table
    results = json.loads((tmp_path / "out/results.json").read_text())
    assert not results["complete"] and results["runs"]["kd"]["test"]["mean"] is None
    assert results["command"] == "python -m tfkd.bench accuracy --protocol path/to/protocol.yaml --out out"  # no folder of this machine


def test_report_only_with_only_reports_just_those_runs_and_their_teachers(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    result = _bench(["--protocol", str(path), "--out", "out", "--report-only", "--only", "kd"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "out/results.json").read_text())
    assert list(results["runs"]) == ["kd"] and list(results["teachers"]) == ["rec"]
    assert results["command"] == "python -m tfkd.bench accuracy --protocol path/to/protocol.yaml --out out --only kd"


def test_tiny_protocol_runs_caches_and_continues_after_interruption(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    out = tmp_path / "out"
    first = _bench(["--protocol", str(path), "--out", str(out), "--jobs", "2"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "0 of 3 runs cached" in first.stdout and "2 at a time" in first.stdout
    assert "tfkd: done:" in (out / "logs" / "kd-seed0.log").read_text()  # side by side: a log each
    results = json.loads((out / "results.json").read_text())
    for name in ("student", "kd"):
        metrics = json.loads((out / "runs" / name / "seed0" / "metrics.json").read_text())
        assert results["runs"][name]["seeds"]["0"]["test_accuracy"] == metrics["test_accuracy"]
        assert 0.0 < metrics["test_accuracy"] <= 1.0
    student_test = results["runs"]["student"]["test"]["mean"]
    assert results["command"] == "python -m tfkd.bench accuracy --protocol path/to/protocol.yaml --out path/to/out --jobs 2"
    assert results["machine"]["cpu_count"] == os.cpu_count() and results["complete"]
    # An interrupted protocol: the kd run lost its result; only it runs again.
    (out / "runs/kd/seed0/metrics.json").unlink()
    (out / "runs/kd/seed0/student.keras").unlink()
    second = _bench(["--protocol", str(path), "--out", str(out)], tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "2 of 3 runs cached" in second.stdout
    assert "kd seed 0" in second.stdout and "student seed 0" not in second.stdout
    assert (out / "runs/kd/seed0/student.keras").is_file()
    # Running a subset still reports every finished run, and records the whole protocol's command.
    (out / "runs/kd/seed0/student.keras").unlink()
    subset = _bench(["--protocol", str(path), "--only", "kd", "--out", str(out)], tmp_path)
    assert subset.returncode == 0, subset.stderr[-2000:]
    assert "1 of 2 runs cached" in subset.stdout and "kd seed 0" in subset.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["runs"]["student"]["test"]["mean"] == student_test
    assert results["command"] == "python -m tfkd.bench accuracy --protocol path/to/protocol.yaml --out path/to/out"
    stale = _bench(["--protocol", str(path), "--out", str(out), "--epochs", "2"], tmp_path)
    assert stale.returncode == 2 and "other settings" in stale.stderr


def test_distillation_overrides_never_touch_the_teachers(tmp_path):
    protocol = protocol_lib.load("cifar10-cpu")
    plain = protocol_lib.jobs(protocol, tmp_path, None)
    tuned = protocol_lib.jobs(protocol, tmp_path, None, overrides=["distill.gamma=0.9", "data.augment=false"],
                              validation_only=True)
    for before, after in zip(plain, tuned):
        if before.kind == "teacher":
            assert after.args == before.args + ["--set", "data.augment=false"]
        else:
            assert "distill.gamma=0.9" in after.args and "data.evaluate_test=false" in after.args


def test_cifar100_standard_smoke_runs_every_pair_with_the_recipe_and_prints_the_published_table(tmp_path):
    """``--smoke``: one epoch of each pair's teacher and of the smoke runs (kd) on a tiny CIFAR-100;
    every run gets the recipe, each student its own pair's teacher, and the report prints the
    published figures beside ours."""
    from conftest import fake_cifar100

    data_dir = fake_cifar100(tmp_path / "cifar-100-python", train=200, test=100)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "tfkd.bench", "accuracy", "--protocol", "cifar100-standard",
                             "--smoke", "--data-dir", str(data_dir), "--out", str(out)],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["recipe"] == "mdistiller-cifar100"
    assert set(results["teachers"]) == {"resnet56", "resnet32x4", "wrn_40_2", "vgg13"}  # no -rec: kd reads plain
    assert set(results["runs"]) == {f"{s}/kd" for s in ("resnet20", "resnet8x4", "wrn_16_2", "vgg8")}
    pairs = {"resnet20": ("resnet56", 70.66), "resnet8x4": ("resnet32x4", 73.33),
             "wrn_16_2": ("wrn_40_2", 74.92), "vgg8": ("vgg13", 72.98)}
    import yaml

    for student, (teacher, published) in pairs.items():
        run = results["runs"][f"{student}/kd"]
        assert run["teachers"] == [teacher] and run["published"] == [published, "mdistiller"]
        assert results["teachers"][teacher]["model"] == teacher
        cfg = yaml.safe_load((out / "runs" / student / "kd" / "seed0" / "config.yaml").read_text())
        assert cfg["recipe"] == "mdistiller-cifar100" and cfg["data"]["batch_size"] == 64
        assert cfg["student"]["optimizer"]["weight_decay_mode"] == "coupled" and cfg["student"]["epochs"] == 1
        assert cfg["distill"]["teachers"] == [str(out / "runs" / "teachers" / teacher / "teacher.keras")]
    md = (out / "results.md").read_text()
    assert "| 70.66 [mdistiller] |" in md and "| 79.42 [RepDistiller] |" in md and "[TTM] zkxufo/TTM README" in md
    assert "--smoke" in results["command"] and "path/to" in results["command"]


def test_pairs_and_published_figures_are_checked(tmp_path):
    base = TINY.replace("student: resnet8\n", "students: [resnet8, resnet14]\n")
    cases = [
        ("pairs:\n  resnet8: {plain: rec}\n", "pairs: expected an entry for each student (resnet8, resnet14)"),
        ("pairs:\n  resnet8: {plain: rec}\n  resnet14: {plain: nope}\n", "pairs.resnet14.plain: 'nope' is not in teachers"),
        ("pairs:\n  resnet8: {plain: rec}\n  resnet14: {plain: rec}\n",
         "runs.kd: teacher role 'rec' is not in every student's pairs entry (plain)"),
        ("published:\n  sources: {A: a paper}\n  runs: {kd: {resnet8: [71.0, B]}}\n",
         "published.runs.kd.resnet8: expected [top-1 %, one of A], got [71.0, 'B']"),
        ("published:\n  runs: {nope: {resnet8: [71.0, A]}}\n", "published.runs.nope: not a run of the protocol"),
        ("recipe: nope\n", "recipe: option 'recipe' = 'nope'"),
        ("smoke: [nope]\n", "smoke: expected a list of some of its runs"),
    ]
    for extra, message in cases:
        path = tmp_path / "p.yaml"
        path.write_text(base + extra)
        with pytest.raises(ConfigError, match=re.escape(message)):
            protocol_lib.load(str(path))
    path.write_text(base + "pairs:\n  resnet8: {rec: rec}\n  resnet14: {rec: rec}\n")
    assert protocol_lib.load(str(path)).teachers_of(protocol_lib.load(str(path)).runs["kd"], "resnet14") == ["rec"]
