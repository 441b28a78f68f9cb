import numpy as np
import pytest

from tfkd import models


def trainable_params(model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


# Published parameter counts (millions) of the CIFAR variants, with the number of classes of
# the table they come from: He et al. 2016 (CIFAR-10) for the plain ResNets, the RepDistiller
# benchmark (CIFAR-100) for the x4 ResNets and the wide ResNets. Batch-norm running statistics
# are buffers, not parameters, in those counts.
PUBLISHED = [
    ("resnet20", 10, "0.27"), ("resnet56", 10, "0.86"), ("resnet110", 10, "1.7"),
    ("resnet32x4", 100, "7.43"), ("resnet8x4", 100, "1.23"),
    ("wrn_40_2", 100, "2.2"), ("wrn_16_2", 100, "0.70"),
]


@pytest.mark.parametrize("name,classes,published", PUBLISHED)
def test_parameter_count_matches_published(name, classes, published):
    count = trainable_params(models.get(name, classes)) / 1e6
    unit = 10.0 ** -len(published.split(".")[1])  # one unit of the last printed digit
    assert abs(count - float(published)) < unit, f"{name}: {count:.4f}M vs published {published}M"


@pytest.mark.parametrize("name", models.names())
def test_every_model_gives_logits_and_stage_features(name):
    model = models.get(name, 7)
    out = model(np.zeros((2, 32, 32, 3), np.float32), training=False)
    assert tuple(out["logits"].shape) == (2, 7)
    shapes = [tuple(f.shape) for f in out["features"]]
    assert len(shapes) >= 3
    sizes = [s[1] for s in shapes]
    assert sizes == sorted(sizes, reverse=True), "stages go from shallow (large) to deep (small)"
    assert sizes[0] == 32 and sizes[-1] in (4, 8)
    # the last stage feeds the head: its channels are the dense layer's inputs
    assert shapes[-1][-1] == model.get_layer("logits").kernel.shape[0]


def test_cifar_resnet_stage_shapes():
    out = models.get("resnet20", 10)(np.zeros((1, 32, 32, 3), np.float32))
    assert [tuple(f.shape) for f in out["features"]] == [(1, 32, 32, 16), (1, 16, 16, 32), (1, 8, 8, 64)]


def test_unknown_model_names_the_known_ones():
    with pytest.raises(KeyError, match="resnet20"):
        models.get("resnet21", 10)
