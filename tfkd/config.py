"""The run configuration: typed dataclasses, read from YAML, overridden from the command line.

OmegaConf merges the layers (defaults < ``--config`` YAML < ``--set key=value`` < dedicated
flags) and type-checks every key against the dataclasses; ``validate`` then checks ranges and
choices. YAML is read as data only (a safe loader): nothing in a config is ever evaluated.

Each pipeline stage has its own section (``teacher`` now; the student, distillation and export
stages add theirs), so a stage's options never collide with another's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tfkd.errors import ConfigError
from tfkd.options import option, section

STAGES = ("teacher", "distill", "export", "all")
EXPORT_FORMATS = ("saved_model", "fp32", "fp16", "dynamic", "int8", "litert_dynamic", "litert_int8",
                  "litert_a16w8", "onnx", "onnx_int8")
STRATEGIES = ("auto", "default", "mirrored", "multiworker")
PIPELINES = ("auto", "memory", "streaming")
POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
#: Upper bounds that catch a mistyped count before it becomes a run that never ends.
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536


@dataclass
class DataConfig:
    """The dataset and its input pipeline (``data.*``)."""

    dataset: str = option("digits", "cifar10, cifar100, digits (bundled, offline), folder:PATH "
                                    "(PATH/train/<class>/* and PATH/test/<class>/*, or PATH/<class>/*) "
                                    "or tfds:NAME (a TensorFlow Datasets image classification dataset)")
    data_dir: Optional[str] = option(None, "cifar10/cifar100: folder with the canonical python "
                                           "batches (cifar-10-batches-py or cifar-100-python); "
                                           "tfds:NAME: the TensorFlow Datasets folder it is prepared "
                                           "in; unset: TensorFlow Datasets' default")
    image_size: int = option(32, "side in pixels of the models' input; images of another size are "
                                 "resized (up to 64 px: stretched; above: resized and centre-cropped)")
    validation_fraction: float = option(0.1, "fraction of the training split held out, "
                                             "stratified and seeded, for validation (0: none)")
    test_fraction: float = option(0.1, "folder:/tfds: datasets without a test split: the fraction "
                                       "of the images held out as the test split (the same for "
                                       "every seed)")
    subset: float = option(1.0, "fraction of the training and test splits to use (stratified, "
                                "seeded), for quick trials; 1: all")
    batch_size: int = option(128, "global batch size, split across replicas")
    augment: bool = option(True, "training augmentation: up to 64 px reflect-pad 4 + random crop, "
                                 "above a random-resized crop; both with horizontal flips (hflip)")
    hflip: Optional[bool] = option(None, "random horizontal flips; unset: on for every dataset "
                                         "except digits, whose mirror images are other glyphs")
    crop_fraction: float = option(0.875, "images above 64 px: evaluation takes the centred square "
                                         "of this fraction of the shorter side (0.875: 224 of 256)")
    crop_scale_min: float = option(0.08, "images above 64 px: the smallest area fraction of a "
                                         "training random-resized crop")
    pipeline: str = option("auto", "auto (in memory when the decoded images fit in "
                                   "data.in_memory_mb, else streamed), memory or streaming "
                                   "(folder:/tfds: datasets read batch by batch with tf.data)")
    in_memory_mb: int = option(1024, "pipeline auto: the decoded size up to which a folder:/tfds: "
                                     "dataset is held in memory")
    stats_images: int = option(2000, "streamed datasets: training images the normalization "
                                     "statistics are estimated from")
    skip_bad_files: bool = option(False, "folder: datasets: leave out (and count) files the header "
                                         "scan finds unreadable instead of stopping")
    strong_view: bool = option(False, "training batches also carry a strongly augmented view of "
                                      "each image (its own crop and flip, then RandAugment with 2 "
                                      "ops and Cutout up to half the side, gray): what MLKD reads; "
                                      "a method that reads it turns it on itself")
    shuffle_buffer: int = option(0, "shuffle buffer in examples; 0: the whole training split")
    evaluate_test: bool = option(True, "evaluate on the test split at the end of training; off "
                                       "while tuning on the validation split")
    test_every_epoch: bool = option(False, "evaluate on the test split after every epoch too, and "
                                           "report the best epoch's test top-1 beside the last "
                                           "(the convention of tables that report the best epoch: "
                                           "it selects on test)")


#: ``*.optimizer.weight_decay_mode``: L2 in the gradient (PyTorch's SGD), or Keras's decoupled decay.
WEIGHT_DECAY_MODES = ("coupled", "decoupled")


@dataclass
class OptimizerConfig:
    """An SGD optimizer and its learning-rate schedule (``*.optimizer.*``)."""

    learning_rate: float = option(0.1, "SGD learning rate at batch size 128; scaled linearly with "
                                       "the global batch size")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(True, "Nesterov momentum")
    weight_decay: float = option(5e-4, "weight decay (see weight_decay_mode)")
    weight_decay_mode: str = option("coupled", "coupled: L2 in the gradient (wd * w added before "
                                               "momentum), as PyTorch's SGD and the field's published "
                                               "recipes; decoupled: Keras's SGD weight_decay (w -= "
                                               "lr * wd * w each step), about 10x weaker at momentum 0.9")
    schedule: str = option("cosine", "learning-rate schedule: cosine, step (multiplied by "
                                     "decay_rate at each milestone epoch) or constant")
    milestones: List[int] = option([150, 180, 210], "step schedule: epochs where the rate decays")
    decay_rate: float = option(0.1, "step schedule: factor applied at each milestone")


@dataclass
class PreciseBNConfig:
    """Batch-norm statistics re-estimated once a stage has trained (``*.precise_bn.*``)."""

    enabled: bool = option(True, "once training ends, set every trainable batch-norm layer's "
                                 "moving mean and variance to its input's statistics over "
                                 "training images seen as at inference (precise BN): the "
                                 "moving averages lag a network that changed fast")
    images: int = option(2000, "training images (a seeded sample, evaluation geometry) the "
                               "statistics are measured on")


@dataclass
class TeacherConfig:
    """The reconstruction-augmented teacher (``teacher.*``)."""

    model: str = option("resnet20", "teacher backbone: a zoo model, keras:NAME (a "
                                    "keras.applications network) or keras_hub:PRESET (a KerasHub "
                                    "image classifier's backbone: a preset name or folder), with a new head")
    weights: Optional[str] = option(None, "keras:/keras_hub: only: the network's starting weights: "
                                          "unset (random), imagenet (downloaded by Keras; for KerasHub "
                                          "the preset's own, also 'preset') or a weights file of the "
                                          "network without its top")
    epochs: int = option(30, "training epochs")
    lambda_cls: float = option(1.0, "weight of the classification (cross-entropy) loss; 0 makes "
                                    "an autoencoder (MKTN Teacher1)")
    lambda_rec: float = option(1.0, "weight of the reconstruction (MSE) loss; 0 makes a plain "
                                    "classifier (MKTN Teacher2)")
    init_from: Optional[str] = option(None, "a trained classifier (.keras: imported, a tfkd teacher "
                                            "or student) that starts the teacher's backbone; the "
                                            "decoder starts fresh (teacher.model is then unused)")
    backbone_lr_scale: float = option(1.0, "learning rate of the backbone relative to the decoder's "
                                           "(0.1 fine-tunes a pretrained backbone gently)")
    freeze_epochs: int = option(0, "epochs at the start in which the backbone does not change "
                                   "(the new decoder learns first)")
    optimizer: OptimizerConfig = section(OptimizerConfig, "teacher optimizer")
    precise_bn: PreciseBNConfig = section(PreciseBNConfig, "the teacher's batch-norm statistics "
                                                           "after training")


@dataclass
class StudentConfig:
    """The student (``student.*``)."""

    model: str = option("resnet8", "student backbone: a zoo model, keras:NAME or keras_hub:PRESET "
                                   "(as teacher.model), with a new head")
    weights: Optional[str] = option(None, "keras:/keras_hub: only: the network's starting weights "
                                          "(as teacher.weights)")
    epochs: int = option(30, "training epochs")
    backbone_lr_scale: float = option(1.0, "learning rate of the student's body (all but its new "
                                           "logits head) relative to the head's and the adapters' "
                                           "(0.1 fine-tunes pretrained weights gently)")
    freeze_epochs: int = option(0, "epochs at the start in which the student's body does not "
                                   "change (its new head and the adapters learn first)")
    optimizer: OptimizerConfig = section(OptimizerConfig, "student (and adapter) optimizer")
    precise_bn: PreciseBNConfig = section(PreciseBNConfig, "the student's batch-norm statistics "
                                                           "after training")


def _distill_config() -> type:
    """``distill.*``: the method, its teachers, and one section of options per registered method
    (``distill.<method>.*``), declared in the method's own module."""
    from tfkd.distill.methods import REGISTRY
    from tfkd.models import wrap

    fields: list[Any] = [
        ("method", str, option("cft", f"a method ({', '.join(n for n, m in REGISTRY.items() if m.modify is None)}) "
                                      "or a composition like cft+dkd, kd+ls (README, Methods)")),
        ("teachers", List[str], option([], "trained teacher files (.keras or run folders) in the "
                                           "method's order (mktn: the reconstruction teacher, then the "
                                           "classifier). Empty: the teachers of this run directory")),
        ("teacher_layers", List[str], option([], "layers of a teacher that is not a tfkd model whose "
                                                 "outputs are its stage feature maps, shallow to deep; "
                                                 "empty: the last layer at each spatial resolution")),
        ("student_layers", List[str], option([], "the same for a keras:/keras_hub: student (layer names of "
                                                 "the keras.applications network)")),
        ("teacher_output", str, option("auto", "what a teacher that is not a tfkd model outputs: "
                                               "auto (read from its last layer's activation), logits "
                                               "or probabilities", lambda v: v in wrap.OUTPUT_CHOICES,
                                       f"one of {', '.join(wrap.OUTPUT_CHOICES)}")),
        ("teacher_input", str, option("auto", "the pixels a teacher that is not a tfkd model takes: "
                                              "auto (read from the model: a leading Rescaling or "
                                              "Normalization layer means [0, 255]; else its run "
                                              "folder's record, else this run's normalization, "
                                              "with a note), 0-255, 0-1, -1-1, imagenet "
                                              "(torchvision's mean/std) or dataset (this run's)",
                                      lambda v: v in wrap.INPUT_CHOICES, f"one of {', '.join(wrap.INPUT_CHOICES)}")),
    ]
    for name, method in REGISTRY.items():
        if method.options is not None:
            fields.append((name, method.options, section(method.options, f"{name}: {method.summary}")))
    return dataclasses.make_dataclass("DistillConfig", fields)


#: Knowledge transfer: the method and every method's options (``distill.*``).
DistillConfig = _distill_config()
DistillConfig.__doc__ = "Knowledge transfer: the method and each method's options (``distill.*``)."


@dataclass
class ExportConfig:
    """The export of the student to edge formats (``export.*``)."""

    formats: List[str] = option(list(EXPORT_FORMATS), "formats to write: saved_model, fp32, fp16, "
                                                      "dynamic, int8 (LiteRT's converter), "
                                                      "litert_dynamic, litert_int8, litert_a16w8 "
                                                      "(LiteRT Quantizer), onnx, onnx_int8 (ONNX "
                                                      "statically quantized, QDQ)")
    opset: int = option(17, "ONNX opset")
    representative: int = option(500, "training images that calibrate the int8 models")
    int8_io: str = option("float32", "model_int8.tflite input/output type: float32, int8 or uint8 "
                                     "(full-integer models for NPUs take integer pixels)")
    tolerance: float = option(1e-4, "max abs logit difference (times the largest |logit| when "
                                    "that exceeds 1) allowed between Keras and an fp32 "
                                    "format")
    max_test_images: int = option(0, "verify on the first N test images (0: all)")
    max_drop: Optional[float] = option(1.0, "accuracy budget: points of validation top-1 a quantized "
                                            "format may lose against the float model; one that loses "
                                            "more keeps its noisiest ops in float until it holds (or "
                                            "is flagged); null: no budget")
    max_val_images: int = option(0, "score the budget on the first N validation images (0: all)")
    latency_runs: int = option(50, "timed batch-1 calls per format")


@dataclass
class RunConfig:
    """The whole run: stage, folder, seed, strategy and every section above."""

    stage: str = option("all", "what to run: teacher (the teacher(s) the method needs), distill "
                               "(the student), export (the student to edge formats), or all "
                               "(every stage in turn)")
    run_dir: str = option("runs/default", "output folder; re-running the same command resumes")
    recipe: str = option("", "a named training recipe under every other setting (tfkd.recipes: "
                             "mdistiller-cifar100); empty: none")
    seed: int = option(0, "random seed (weights, validation split, shuffling, augmentation)")
    strategy: str = option("auto", "tf.distribute strategy: auto (multiworker when TF_CONFIG is "
                                   "set, mirrored on several GPUs, else default), default, "
                                   "mirrored or multiworker")
    deterministic: bool = option(False, "TensorFlow op determinism: with the same seed, two runs "
                                         "on the same machine give identical results (slower)")
    sync_batchnorm: bool = option(False, "batch statistics over the global batch across replicas")
    mixed_precision: str = option("float32", "Keras dtype policy of the models while they train: "
                                             "float32, mixed_bfloat16 or mixed_float16 (losses, the "
                                             "discriminator and metrics stay float32; saved models "
                                             "and exports are float32)")
    progress: Optional[int] = option(None, "Keras progress output: 0 silent, 1 bar, 2 one line per "
                                           "epoch; unset: bar on a terminal, lines otherwise")
    data: DataConfig = section(DataConfig, "dataset and input pipeline")
    teacher: TeacherConfig = section(TeacherConfig, "the reconstruction-augmented teacher")
    student: StudentConfig = section(StudentConfig, "the student")
    distill: DistillConfig = section(DistillConfig, "knowledge transfer to the student")
    export: ExportConfig = section(ExportConfig, "export of the student to run_dir/export")


def _walk(cls: type, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """Yields (dotted key, default, help) for every leaf option of a config dataclass."""
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.default_factory is not
                                                 dataclasses.MISSING and dataclasses.is_dataclass(
                                                     f.default_factory)):
            yield from _walk(f.default_factory, f"{prefix}{f.name}.")
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            yield f"{prefix}{f.name}", default, f.metadata.get("help", "")


def describe_options() -> str:
    """Every config key with its default and meaning, for ``--help``."""
    lines = []
    for key, default, help_text in _walk(RunConfig):
        shown = "null" if default is None else default
        lines.append(f"  {key} = {shown}\n      {help_text}")
    return "\n".join(lines)


def _config_error(error: OmegaConfBaseException, source: str) -> ConfigError:
    """Turns an OmegaConf exception into a one-line message naming the key and the source."""
    key = getattr(error, "full_key", None) or "?"
    message = str(getattr(error, "msg", None) or error).splitlines()[0]
    return ConfigError(f"{source}: key '{key}': {message}")


#: Keys that were renamed: the old spelling still works and means the new key.
RENAMED: dict[str, str] = {"verbose": "progress"}


def _renamed_key(key: str, method: str) -> str:
    """The current spelling of ``key``: renamed keys, and the flat ``distill.*`` keys of before
    method namespaces (``distill.beta`` -> ``distill.<method>.beta``)."""
    from tfkd.distill.methods import legacy_key

    key = RENAMED.get(key.strip(), key.strip())
    return legacy_key(key, method) or key


def _chosen_method(data: Any, dotlist: list[str], flags: dict[str, Any]) -> str:
    """The method the layers choose (flags over --set over the YAML file over the default)."""
    if flags.get("distill.method"):
        return str(flags["distill.method"])
    for item in reversed(dotlist):
        if item.split("=", 1)[0].strip() == "distill.method" and "=" in item:
            return item.split("=", 1)[1].strip()
    section_ = data.get("distill") if isinstance(data, dict) else None
    if isinstance(section_, dict) and section_.get("method"):
        return str(section_["method"])
    return "cft"


def _move_legacy_distill(data: dict[str, Any], method: str) -> dict[str, Any]:
    """Moves a YAML config's flat ``distill.*`` keys of before method namespaces to their place."""
    from tfkd.distill.methods import LEGACY_KEYS, legacy_key

    section_ = data.get("distill")
    if not isinstance(section_, dict):
        return data
    for key in [k for k in section_ if k in LEGACY_KEYS]:
        _, owner, *rest = legacy_key(f"distill.{key}", method).split(".")
        target = section_.setdefault(owner, {})
        for part in rest[:-1]:
            target = target.setdefault(part, {})
        value = section_.pop(key)
        if isinstance(value, dict) and isinstance(target.get(rest[-1]), dict):
            target[rest[-1]].update(value)
        else:
            target.setdefault(rest[-1], value)
    return data


def _move_renamed(data: dict[str, Any]) -> dict[str, Any]:
    """Moves every renamed key of a nested mapping (a YAML config) to its new place."""
    for old, new in RENAMED.items():
        *parents, leaf = old.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            value = node.pop(leaf)
            *new_parents, new_leaf = new.split(".")
            target = data
            for part in new_parents:
                target = target.setdefault(part, {})
            target.setdefault(new_leaf, value)
    return data


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(f"key {key!r} twice")
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key written twice in one mapping (YAML keeps the last, which
    silently drops the first). Keys that a ``<<`` merge brings in may be overridden, as YAML means."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        """The mapping of ``node``; ``_DuplicateKey`` for a key it writes twice."""
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], line)
                    seen[key] = line
                except TypeError:  # an unhashable key: the constructor says so
                    continue
        return super().construct_mapping(node, deep=deep)


def read_yaml_file(path_text: str, what: str) -> Any:
    """Reads a YAML file as data (safe loader): UTF-8, or UTF-16 with its byte-order mark.

    Raises ``ConfigError`` naming the file when it is missing, a folder, unreadable, binary, not
    valid YAML, or writes a key twice in one mapping (naming the key and both lines).
    """
    path = Path(path_text)
    try:
        if path.is_dir():
            raise ConfigError(f"{what} {path_text}: is a folder, expected a YAML file")
        if not path.is_file():
            raise ConfigError(f"{what} {path_text}: not found")
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{what} {path_text}: cannot be read ({error.strerror or error})") from None
    try:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            text = raw.decode("utf-16")
        else:
            text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path_text}: not a text file (expected UTF-8 YAML)") from None
    if "\x00" in text:
        raise ConfigError(f"{what} {path_text}: not a text file (expected UTF-8 YAML)")
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a safe loader)
    except _DuplicateKey as error:
        raise ConfigError(f"{what} {path_text}: key {error.key!r} is written twice in one mapping "
                          f"(lines {error.first} and {error.second}); keep one") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {path_text}: not valid YAML "
                          f"({str(error).splitlines()[0]})") from None


def load(config_file: str | None = None, overrides: dict[str, Any] | None = None,
         dotlist: list[str] | None = None) -> RunConfig:
    """Builds the run configuration: defaults, then the YAML file, then ``--set`` items, then
    the dedicated flags in ``overrides`` (dotted key -> value, ``None`` values ignored)."""
    merged = _defaults()
    layers: list[tuple[str, Any]] = []
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    data: Any = None
    if config_file:
        data = read_yaml_file(config_file, "config file")
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"config file {config_file}: expected a mapping of options, "
                              f"got {type(data).__name__}")
    method = _chosen_method(data, list(dotlist or []), flags)
    if config_file:
        try:
            data = _move_legacy_distill(_move_renamed(data or {}), method)
            layers.append((f"config file {config_file}", OmegaConf.create(data)))
        except OmegaConfBaseException as error:
            raise _config_error(error, f"config file {config_file}") from None
    for item in dotlist or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            layers.append((f"--set {item}", OmegaConf.from_dotlist([f"{_renamed_key(key, method)}={value}"])))
        except OmegaConfBaseException as error:
            raise _config_error(error, f"--set {item}") from None
    for key, value in flags.items():
        layer = OmegaConf.create()
        OmegaConf.update(layer, key, value, force_add=True)
        layers.append((f"--{key.split('.')[-1].replace('_', '-')}", layer))
    merged = _merged(merged, layers)
    if merged.recipe:  # under everything the user gave, which the recipe's choice depends on
        merged = _merged(_defaults(), [_recipe_layer(merged), *layers])
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise _config_error(error, "config") from None
    validate(config)
    return config


@functools.cache
def _defaults() -> Any:
    """``RunConfig``'s defaults as a structured config, built once (``OmegaConf.merge`` copies
    its first argument, so it is never changed)."""
    return OmegaConf.structured(RunConfig)


def _merged(merged: Any, layers: list[tuple[str, Any]]) -> Any:
    """``layers`` merged over ``merged`` in one pass (each merge copies the whole config); when
    that fails, layer by layer, so that the error names the layer."""
    try:
        return OmegaConf.merge(merged, *(layer for _, layer in layers))
    except OmegaConfBaseException:
        pass
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as error:
            raise _config_error(error, source) from None
    return merged


def _recipe_layer(merged: Any) -> tuple[str, Any]:
    """The recipe of ``merged`` (``recipe``) as a config layer for its teacher/student pair: the
    teacher's model is the one its first ``distill.teachers`` file was trained as (else
    ``teacher.model``)."""
    from tfkd import recipes, rundir

    given = list(merged.distill.teachers or [])
    teacher = (rundir.teacher_model(given[0]) if given else None) or merged.teacher.model
    settings = recipes.get(merged.recipe).settings(teacher, merged.student.model)
    layer = OmegaConf.create()
    for key, value in {"recipe": merged.recipe, **settings}.items():
        OmegaConf.update(layer, key, value, force_add=True)
    return f"recipe {merged.recipe}", layer


def _check(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"option '{key}' = {value!r}: expected {expected}")


def _check_weights(part: str, model: str, weights: Optional[str]) -> None:
    if weights is None:
        return
    _check(model.startswith(("keras:", "keras_hub:")), f"{part}.weights", weights,
           f"unset: {part}.model {model} is a zoo model"
           + (" (start the teacher from a trained classifier with teacher.init_from)" if part == "teacher" else ""))
    hub = model.startswith("keras_hub:")
    _check(weights == "imagenet" or (hub and weights == "preset") or Path(weights).is_file(),
           f"{part}.weights", weights,
           ("imagenet or preset (the preset's own weights), " if hub else "imagenet or ")
           + "an existing weights file (.weights.h5 / .h5 of the network without its top)")


def validate(config: RunConfig) -> None:
    """Checks choices and ranges; raises ``ConfigError`` naming the first bad key.

    Imports nothing heavy (no TensorFlow, no Keras): a bad option fails in a fraction of a second.
    """
    from tfkd import models, rundir
    from tfkd.distill import methods
    from tfkd.options import checks

    for key, value in _leaves(config):
        _check(not isinstance(value, float) or math.isfinite(value), key, value, "a finite number")
    _check(config.stage in STAGES, "stage", config.stage, f"one of {', '.join(STAGES)}")
    _check(config.strategy in STRATEGIES, "strategy", config.strategy,
           f"one of {', '.join(STRATEGIES)}")
    _check(config.mixed_precision in POLICIES, "mixed_precision", config.mixed_precision,
           f"one of {', '.join(POLICIES)}")
    _check(bool(str(config.run_dir).strip()), "run_dir", config.run_dir, "a folder path")
    problem = rundir.folder_problem(config.run_dir)
    _check(problem is None, "run_dir", config.run_dir, f"a folder tfkd can write ({problem})")
    _check(0 <= config.seed < 2**32, "seed", config.seed, "an integer from 0 to 4294967295")
    data = config.data
    _check(data.data_dir is None or bool(data.data_dir.strip()), "data.data_dir", data.data_dir,
           "a folder path, or unset for TensorFlow Datasets")
    dataset_ok = data.dataset in ("cifar10", "cifar100", "digits") or any(
        data.dataset.startswith(p) and len(data.dataset.strip()) > len(p) for p in ("folder:", "tfds:"))
    _check(dataset_ok, "data.dataset", data.dataset, "cifar10, cifar100, digits, folder:PATH or tfds:NAME")
    _check(8 <= data.image_size <= 4096, "data.image_size", data.image_size, "an integer from 8 to 4096")
    _check(0.0 <= data.validation_fraction < 1.0, "data.validation_fraction",
           data.validation_fraction, "a fraction in [0, 1)")
    _check(0.0 < data.test_fraction < 1.0, "data.test_fraction", data.test_fraction, "a fraction in (0, 1)")
    _check(0.0 < data.crop_fraction <= 1.0, "data.crop_fraction", data.crop_fraction, "a fraction in (0, 1]")
    _check(0.0 < data.crop_scale_min <= 1.0, "data.crop_scale_min", data.crop_scale_min, "a fraction in (0, 1]")
    _check(data.pipeline in PIPELINES, "data.pipeline", data.pipeline, f"one of {', '.join(PIPELINES)}")
    _check(data.in_memory_mb >= 0, "data.in_memory_mb", data.in_memory_mb, "an integer >= 0")
    _check(1 <= data.stats_images <= 1_000_000, "data.stats_images", data.stats_images,
           "an integer from 1 to 1000000")
    _check(0.0 < data.subset <= 1.0, "data.subset", data.subset, "a fraction in (0, 1]")
    _check(1 <= data.batch_size <= MAX_BATCH, "data.batch_size", data.batch_size,
           f"an integer from 1 to {MAX_BATCH}")
    _check(data.shuffle_buffer >= 0, "data.shuffle_buffer", data.shuffle_buffer, "an integer >= 0")
    teacher = config.teacher
    _check(models.is_known(teacher.model), "teacher.model", teacher.model, models.expected_names())
    _check_weights("teacher", teacher.model, teacher.weights)
    _check(1 <= teacher.epochs <= MAX_EPOCHS, "teacher.epochs", teacher.epochs,
           f"an integer from 1 to {MAX_EPOCHS}")
    _check(teacher.init_from is None or bool(str(teacher.init_from).strip()), "teacher.init_from",
           teacher.init_from, "a .keras file, or unset")
    _check(teacher.backbone_lr_scale >= 0, "teacher.backbone_lr_scale", teacher.backbone_lr_scale, ">= 0")
    _check(0 <= teacher.freeze_epochs <= teacher.epochs, "teacher.freeze_epochs", teacher.freeze_epochs,
           f"an integer from 0 to teacher.epochs ({teacher.epochs})")
    _check(teacher.lambda_cls >= 0 and teacher.lambda_rec >= 0 and
           teacher.lambda_cls + teacher.lambda_rec > 0, "teacher.lambda_cls/lambda_rec",
           (teacher.lambda_cls, teacher.lambda_rec), "non-negative weights, not both 0")
    student = config.student
    _check(models.is_known(student.model), "student.model", student.model, models.expected_names())
    _check_weights("student", student.model, student.weights)
    _check(1 <= student.epochs <= MAX_EPOCHS, "student.epochs", student.epochs,
           f"an integer from 1 to {MAX_EPOCHS}")
    _check(student.backbone_lr_scale >= 0, "student.backbone_lr_scale", student.backbone_lr_scale, ">= 0")
    _check(0 <= student.freeze_epochs <= student.epochs, "student.freeze_epochs", student.freeze_epochs,
           f"an integer from 0 to student.epochs ({student.epochs})")
    for name, section_ in (("teacher", teacher), ("student", student)):
        _check(1 <= section_.precise_bn.images <= 1_000_000, f"{name}.precise_bn.images",
               section_.precise_bn.images, "an integer from 1 to 1000000")
    for name, opt in (("teacher", teacher.optimizer), ("student", student.optimizer)):
        _check(opt.learning_rate > 0, f"{name}.optimizer.learning_rate", opt.learning_rate, "> 0")
        _check(0 <= opt.momentum < 1, f"{name}.optimizer.momentum", opt.momentum, "in [0, 1)")
        _check(opt.weight_decay >= 0, f"{name}.optimizer.weight_decay", opt.weight_decay, ">= 0")
        _check(opt.weight_decay_mode in WEIGHT_DECAY_MODES, f"{name}.optimizer.weight_decay_mode",
               opt.weight_decay_mode, " or ".join(WEIGHT_DECAY_MODES))
        _check(opt.schedule in ("cosine", "step", "constant"), f"{name}.optimizer.schedule",
               opt.schedule, "cosine, step or constant")
        _check(0 < opt.decay_rate <= 1, f"{name}.optimizer.decay_rate", opt.decay_rate, "in (0, 1]")
        _check(all(1 <= m <= MAX_EPOCHS for m in opt.milestones) and list(opt.milestones) == sorted(set(opt.milestones)),
               f"{name}.optimizer.milestones", opt.milestones, "increasing positive epochs")
    distill = config.distill
    method = methods.resolve(distill.method)  # ConfigError naming an unknown part
    wanted = len(method.teachers)
    _check(len(distill.teachers) in (0, wanted), "distill.teachers", distill.teachers,
           f"{wanted} teacher file(s) for method {distill.method}, or none")
    for key, value, passes, expected in checks(distill, "distill."):
        _check(passes, key, value, expected)
    for name in method.namespaces:  # the stages spec is checked against the models later
        options = getattr(distill, name)
        if hasattr(options, "adv_warmup_epochs"):
            _check(options.adv_warmup_epochs <= MAX_EPOCHS, f"distill.{name}.adv_warmup_epochs",
                   options.adv_warmup_epochs, f"an integer from 0 to {MAX_EPOCHS}")
    export = config.export
    _check(bool(export.formats) and all(f in EXPORT_FORMATS for f in export.formats), "export.formats",
           export.formats, f"a list of {', '.join(EXPORT_FORMATS)}")
    _check(export.int8_io in ("float32", "int8", "uint8"), "export.int8_io", export.int8_io,
           "float32, int8 or uint8")
    _check(1 <= export.representative <= 100_000, "export.representative", export.representative,
           "an integer from 1 to 100000")
    _check(export.tolerance > 0, "export.tolerance", export.tolerance, "> 0")
    _check(export.max_test_images >= 0, "export.max_test_images", export.max_test_images, ">= 0")
    _check(export.max_drop is None or 0 <= export.max_drop <= 100, "export.max_drop", export.max_drop,
           "points of top-1 from 0 to 100, or null")
    _check(export.max_val_images >= 0, "export.max_val_images", export.max_val_images, ">= 0")
    _check(7 <= export.opset <= 21, "export.opset", export.opset, "an ONNX opset from 7 to 21")
    _check(1 <= export.latency_runs <= 100_000, "export.latency_runs", export.latency_runs,
           "an integer from 1 to 100000")
    _check(config.progress in (None, 0, 1, 2), "progress", config.progress, "0, 1, 2 or null")


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf option of a config object."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def flatten(config: RunConfig) -> dict[str, Any]:
    """The configuration as ``{dotted key: value}`` (lists as lists)."""
    return {key: list(value) if isinstance(value, (list, tuple)) else value
            for key, value in _leaves(config)}


def to_yaml(config: RunConfig) -> str:
    """The resolved configuration as YAML, as saved in the run directory."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))
