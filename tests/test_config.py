import pytest

from tfkd import config
from tfkd.errors import ConfigError


def test_defaults_run_the_whole_pipeline_on_digits():
    cfg = config.load()
    assert (cfg.stage, cfg.data.dataset, cfg.teacher.model) == ("all", "digits", "resnet20")
    assert (cfg.teacher.lambda_cls, cfg.teacher.lambda_rec) == (1.0, 1.0)  # METHOD.md defaults


def test_layers_yaml_then_set_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  batch_size: 64\nteacher:\n  epochs: 5\n  lambda_rec: 0.5\n")
    cfg = config.load(str(path), overrides={"teacher.epochs": 7, "seed": None},
                      dotlist=["teacher.lambda_rec=2", "teacher.epochs=6"])
    assert cfg.data.batch_size == 64 and cfg.teacher.lambda_rec == 2.0 and cfg.teacher.epochs == 7
    assert cfg.seed == 0  # None flags do not override


def test_yaml_round_trip(tmp_path):
    cfg = config.load(dotlist=["teacher.model=wrn_16_2", "data.hflip=false"])
    path = tmp_path / "saved.yaml"
    path.write_text(config.to_yaml(cfg))
    assert config.load(str(path)) == cfg


@pytest.mark.parametrize("yaml_text,dotlist,match", [
    ("teacher:\n  epoch: 3\n", [], "key 'teacher.epoch'"),
    ("", ["data.batch_size=big"], "key 'data.batch_size'"),
    ("", ["teacher.epochs=-2"], "option 'teacher.epochs' = -2"),
    ("", ["teacher.model=resnet21"], "option 'teacher.model'"),
    ("", ["data.dataset=mnist"], "option 'data.dataset'"),
    ("", ["data.validation_fraction=1.5"], "option 'data.validation_fraction'"),
    ("", ["teacher.lambda_cls=0", "teacher.lambda_rec=0"], "not both 0"),
    ("", ["distill.discriminator.width=0"], "option 'distill.cft.discriminator.width' = 0.0"),
    ("- a\n- b\n", [], "expected a mapping"),
    ("teacher: [unclosed\n", [], "not valid YAML"),
    ("teacher:\n  epochs: 3\n  lambda_rec: 0.5\n  epochs: 30\n", [],
     r"key 'epochs' is written twice in one mapping \(lines 2 and 4\)"),
    ("seed: 1\nseed: 2\n", [], r"key 'seed' is written twice in one mapping \(lines 1 and 2\)"),
    ("", ["noequals"], "expected KEY=VALUE"),
])
def test_bad_config_gives_one_clear_line(tmp_path, yaml_text, dotlist, match):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match) as info:
        config.load(str(path), dotlist=dotlist)
    assert "\n" not in str(info.value)


def test_yaml_is_data_never_code(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(str(path))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="nope.yaml: not found"):
        config.load("nope.yaml")


def test_help_lists_every_option():
    text = config.describe_options()
    for key in ("data.dataset", "data.validation_fraction", "teacher.lambda_rec",
                "teacher.optimizer.learning_rate", "strategy", "sync_batchnorm"):
        assert f"  {key} = " in text


def test_a_merge_key_may_be_overridden_as_yaml_means(tmp_path):
    """``<<: *anchor`` then an explicit key: the explicit one wins, no duplicate (the anchor
    protocol's ablations are written this way)."""
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {epochs: 3, lambda_rec: 0.5}\nteacher: {<<: *b, epochs: 4}\n")
    assert config.read_yaml_file(str(path), "config file")["teacher"] == {"epochs": 4, "lambda_rec": 0.5}
