"""``reviewkd``: knowledge review (Chen et al., CVPR 2021), as mdistiller computes it:
``CE + 5 * warm-up * HCL(ABF-fused student features, teacher features)``.

The student's stage outputs and its pooled feature (as a 1x1 map), deepest first, pass
attention-based fusion (ABF) modules: each maps its stage with a 1x1 conv + BN to a middle width
(min(512, the deepest channels)), fuses it with the previous (deeper) module's output resized to
its size through two sigmoid attention maps, and returns a 3x3 conv + BN of the result at the
teacher stage's size and width. The hierarchical context loss (HCL) compares each output with the
teacher's pre-ReLU stage output (its pooled feature for the last): the MSE, plus the MSE of 4x4,
2x2 and 1x1 adaptive average pools (PyTorch's bins, so any map size) with weights 1/2, 1/4, 1/8,
normalized by their sum. The weight 5 is
mdistiller's CIFAR setting; the term warms up linearly over 20 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tfkd.distill.terms import Term, linear_warmup
from tfkd.options import non_negative, option

NAME = "reviewkd"
SUMMARY = "CE + 5 * HCL(attention-fused student stages, teacher stages), 20-epoch warm-up"


@dataclass
class Options:
    """``distill.reviewkd.*``"""

    weight: float = option(5.0, "weight of the review term (mdistiller's CIFAR REVIEWKD_WEIGHT)", **non_negative())
    warmup_epochs: float = option(20.0, "epochs of linear warm-up, rising once per epoch (under 1: "
                                  "every step; 0: none)", **non_negative())
    ce_weight: float = option(1.0, "cross-entropy weight", **non_negative())
    max_mid_channels: int = option(512, "largest width of the fusion modules", lambda v: v >= 1, ">= 1")


def pooling_matrix(size: int, out: int) -> Any:
    """``(out, size)`` weights of adaptive average pooling along one axis, as PyTorch's
    ``adaptive_avg_pool2d`` bins it: output ``i`` averages inputs ``floor(i * size / out)`` to
    ``ceil((i + 1) * size / out)`` (exclusive); bins overlap when ``out`` does not divide ``size``."""
    import numpy as np

    matrix = np.zeros((out, size), np.float32)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_average_pool(x: Any, out: int) -> Any:
    """``x`` (NHWC) average-pooled to ``out x out`` with PyTorch's adaptive bins, for any map size
    (14x14, 7x7 or 6x6 maps of a 224-px student as CIFAR's 32/16/8)."""
    from keras import ops

    rows = ops.convert_to_tensor(pooling_matrix(int(x.shape[1]), out), x.dtype)
    cols = ops.convert_to_tensor(pooling_matrix(int(x.shape[2]), out), x.dtype)
    return ops.einsum("ih,nhwc,jw->nijc", rows, x, cols)


def hcl(student: list[Any], teacher: list[Any]) -> Any:
    """The hierarchical context loss summed over levels: per pair, the MSE plus the MSE of the
    4x4, 2x2 and 1x1 adaptive average pools (levels at least the map's height skipped) with weights
    1/2, 1/4, 1/8, over the sum of the weights used (the authors' ``hcl``)."""
    from keras import ops

    total = 0.0
    for fs, ft in zip(student, teacher):
        loss, weight, norm = ops.mean(ops.square(fs - ft)), 1.0, 1.0
        for level in (4, 2, 1):
            if level >= int(fs.shape[1]):
                continue
            weight /= 2.0
            loss = loss + ops.mean(ops.square(adaptive_average_pool(fs, level) - adaptive_average_pool(ft, level))) * weight
            norm += weight
        total = total + loss / norm
    return total


def fusion_module(in_shape: tuple[int, ...], mid: int, out_shape: tuple[int, ...], fuse: bool,
                  sync_bn: bool, name: str) -> Any:
    """One ABF module: ``(x, deeper) -> (output, fused)`` (without ``deeper`` when not ``fuse``)."""
    import keras

    from tfkd.models.common import batch_norm

    init = keras.initializers.VarianceScaling(1.0, "fan_in", "uniform")  # kaiming_uniform_(a=1)
    x_in = keras.Input(in_shape, name="stage")
    inputs = [x_in]
    x = batch_norm(keras, sync_bn, name="bn1")(
        keras.layers.Conv2D(mid, 1, use_bias=False, kernel_initializer=init, name="conv1")(x_in))
    if fuse:
        deeper = keras.Input((None, None, mid), name="deeper")
        inputs.append(deeper)
        y = keras.layers.Resizing(in_shape[0], in_shape[1], interpolation="nearest", name="up")(deeper)
        z = keras.layers.Conv2D(2, 1, activation="sigmoid", name="att_conv")(keras.layers.Concatenate()([x, y]))
        x = keras.layers.Add()([keras.layers.Multiply()([x, z[..., :1]]), keras.layers.Multiply()([y, z[..., 1:]])])
    fused = x
    if tuple(in_shape[:2]) != tuple(out_shape[:2]):
        x = keras.layers.Resizing(out_shape[0], out_shape[1], interpolation="nearest", name="resize")(x)
    out = batch_norm(keras, sync_bn, name="bn2")(
        keras.layers.Conv2D(out_shape[-1], 3, padding="same", use_bias=False, kernel_initializer=init,
                            name="conv2")(x))
    return keras.Model(inputs, [out, fused], name=name)


class Review(Term):
    """The fusion modules and the HCL term."""

    name = slot = "review"

    def __init__(self, weight: float, warmup_epochs: float, steps_per_epoch: int, max_mid: int,
                 teacher: str = "teacher") -> None:
        super().__init__(weight, teacher)
        self.warmup_epochs, self.steps_per_epoch, self.max_mid = float(warmup_epochs), int(steps_per_epoch), int(max_mid)

    def build(self, ctx: Any) -> None:
        teacher = ctx.teacher(self.teacher)
        s_shapes, t_shapes = ctx.shapes(ctx.student), ctx.shapes(teacher, "preact")
        depth = min(len(s_shapes), len(t_shapes))
        self.s_stages = list(range(len(s_shapes) - depth, len(s_shapes)))
        self.t_stages = list(range(len(t_shapes) - depth, len(t_shapes)))
        ins = [s_shapes[i] for i in self.s_stages] + [(1, 1, s_shapes[-1][-1])]
        outs = [t_shapes[i] for i in self.t_stages] + [(1, 1, t_shapes[-1][-1])]
        mid = min(self.max_mid, ins[-1][-1])
        # deepest (the pooled feature) first; it has nothing deeper to fuse with
        self.modules = [fusion_module(ins[i], mid, outs[i], i < len(ins) - 1, ctx.sync_bn, f"review_abf{i + 1}")
                        for i in range(len(ins))]
        self.layers = list(self.modules)

    def compute(self, batch: Any) -> Any:
        from keras import ops

        s_feats = [batch.student["features"][i] for i in self.s_stages]
        s_feats.append(ops.mean(s_feats[-1], axis=(1, 2), keepdims=True))
        t_pre = batch.teachers[self.teacher]["preact"]
        t_feats = [t_pre[i] for i in self.t_stages]
        t_feats.append(ops.mean(batch.teachers[self.teacher]["features"][self.t_stages[-1]], axis=(1, 2), keepdims=True))
        outputs: list[Any] = [None] * len(s_feats)
        deeper = None
        for i in reversed(range(len(s_feats))):
            inputs = [s_feats[i]] if deeper is None else [s_feats[i], deeper]
            outputs[i], deeper = self.modules[i](inputs, training=batch.training)
        return hcl(outputs, t_feats)

    def weight_at(self, step: Any) -> Any:
        return linear_warmup(self.weight, self.warmup_epochs, self.steps_per_epoch, step)


def terms(options: Options, run: Any) -> list[Any]:
    """CE and the review term."""
    from tfkd.distill.terms import CrossEntropy

    return [CrossEntropy(options.ce_weight),
            Review(options.weight, options.warmup_epochs, run.steps_per_epoch, options.max_mid_channels)]
