"""PyTorch CIFAR ResNets (option A) imported into the zoo reach their published accuracy."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest

from tfkd import models
from tfkd.errors import ModelError
from tfkd.models import pytorch

#: Published parameter counts with the 10-class head (akamaster/pytorch_resnet_cifar10).
PUBLISHED_PARAMS = {"resnet20a": 271_098, "resnet32a": 466_426, "resnet44a": 661_754, "resnet56a": 857_082}


@pytest.mark.parametrize("name,params", PUBLISHED_PARAMS.items())
def test_option_a_resnets_have_the_published_parameter_counts(name, params):
    assert models.get(name, 10).count_params() == params


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    import keras

    from tfkd.models.resnet import shortcut_a

    x = np.random.default_rng(0).normal(size=(2, 8, 8, 16)).astype(np.float32)
    inputs = keras.Input((8, 8, 16))
    out = np.asarray(keras.Model(inputs, shortcut_a(keras, inputs, 32, "s"))(x))
    expected = np.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (8, 8)))  # PyTorch's LambdaLayer
    np.testing.assert_array_equal(out, expected)


def test_stride_two_convolutions_pad_like_pytorch():
    """A 3x3 stride-2 conv of the zoo's option-A ResNet sees PyTorch's window (pad 1 each side)."""
    model = models.get("resnet20a", 10)
    conv = model.get_layer("stage2_block1_conv1")
    assert conv.padding == "valid" and conv.strides == (2, 2)
    assert model.get_layer("stage2_block1_conv1_pad").padding == ((1, 1), (1, 1))


def test_imported_resnet20_reaches_its_published_accuracy(teachers_dir, cifar10_dir):
    from tfkd import data

    source = data.load_cifar_batches("cifar10", str(cifar10_dir))
    for checkpoint in ("resnet20.npz", "resnet20-12fca82f.th"):  # the .npz and the original file
        model = pytorch.import_cifar_resnet(pytorch.read_state_dict(teachers_dir / checkpoint))
        logits = model.predict(source.test_images.astype(np.float32), batch_size=500, verbose=0)["logits"]
        accuracy = float(np.mean(logits.argmax(1) == source.test_labels))
        assert len(source.test_labels) == 10_000 and abs(accuracy - 0.9173) <= 0.0005, (checkpoint, accuracy)
        assert model.count_params() == PUBLISHED_PARAMS["resnet20a"]


def test_checkpoint_reader_runs_no_code(tmp_path):
    """A pickle that would call os.system is refused, never run."""

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    stream = io.BytesIO()
    for part in (pytorch._LEGACY_MAGIC, 1001, {}, {"state_dict": Evil()}):
        pickle.dump(part, stream, protocol=2)
    (tmp_path / "evil.th").write_bytes(stream.getvalue())
    with pytest.raises(ModelError, match="refusing to load posix.system|refusing to load os.system"):
        pytorch.read_state_dict(tmp_path / "evil.th")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("change,match", [
    (lambda s: s.pop("layer2.0.bn1.running_var"), "missing 'layer2.0.bn1.running_var'"),
    (lambda s: s.update({"linear.bias": np.zeros(3, np.float32)}), "'linear.bias' is (3,)"),
    (lambda s: s.update({"extra.weight": np.zeros(3, np.float32)}), "no place for: extra.weight"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("layer3.2.")], "stages of [3, 3, 2] blocks"),
])
def test_bad_state_dicts_are_refused_naming_the_tensor(teachers_dir, change, match):
    state = pytorch.read_state_dict(teachers_dir / "resnet20.npz")
    change(state)
    with pytest.raises(ModelError, match=match.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        pytorch.import_cifar_resnet(state)
