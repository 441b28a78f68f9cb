"""``sdd``: scale decoupled distillation (Wei et al., CVPR 2024, "Scale Decoupled Distillation"),
as its authors' code (shicaiwei123/SDD-CVPR2024: ``SDD_KD`` and ``sdd_kd_loss`` in
``mdistiller/distillers/KD.py``, ``multi_dkd`` in ``SDD_DKD.py``, the ``SPP`` module of
``mdistiller/models/cifar/utils.py``) computes it: ``0.1 CE + 0.9 L_SDD``.

Each model's last feature map (the tensor its classifier head average-pools) is split into
regions at the scales M: adaptive average pooling (PyTorch's bins) to a 4x4 grid, and from that
grid to s x s for each s in M, so M = [1, 2, 4] gives N = 1 + 4 + 16 = 21 regions in the order
[1x1, 2x2 row-major, 4x4 row-major] (M = [1, 2]: 5). Every region's pooled feature goes through
the model's own classifier (its dense ``logits`` layer), giving N logit vectors per example for
the student and for the teacher. Per region and example, the KD loss at temperature T (4) times
T^2, ``l[b, r] = T^2 KL(softmax(t[b, r] / T) || softmax(s[b, r] / T))``; a region whose teacher
prediction is right while the teacher's global (1x1) prediction is wrong, or the reverse, weighs
2 (``inconsistent_weight``), the others 1; ``L_SDD = sum_{b, r} w[b, r] l[b, r] / (N B)``.

Where the map's size is not a multiple of 4 (7x7, 6x6) the 4x4 bins overlap, and the coarser
scales average the 4x4 grid, not the map, as the authors' SPP does: their 1x1 region is then not
exactly the model's own (global-average) logits. M = [1] is plain KD on the model's logits (the
authors' code falls back to ``kd_loss`` there).

``logit_loss=dkd`` is the authors' SDD-DKD: DKD's per-example ``alpha TCKD + beta NCKD`` (T^2
included) in place of KD per region, the same weighting and normalization, and their SDD-DKD
setting: CE weight 1, term weight 1, DKD's alpha 1 and beta 8 (6 or 2 per pair in their
configs, as DKD's), linearly warmed up over 20 epochs (``train_origin.py --warmup``). The
authors' SDD-KD has no warm-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

from tfkd.distill.terms import LogitTerm, linear_warmup
from tfkd.options import non_negative, option, positive

NAME = "sdd"
SUMMARY = ("0.1 CE + 0.9 mean over regions (1x1, 2x2, 4x4 of the last map, each through the model's "
           "classifier) of T^2 KL, regions the teacher's global prediction disagrees with x2, T 4")

#: The region grid the authors' SPP pools the map to first; every scale is pooled from it.
GRID = 4
LOGIT_LOSSES = ("kd", "dkd")
#: The authors' (ce_weight, weight, warmup_epochs) of SDD-KD and SDD-DKD.
AUTHORS = {"kd": (0.1, 0.9, 0.0), "dkd": (1.0, 1.0, 20.0)}


def _scales_ok(value: Any) -> bool:
    try:
        scales = [int(v) for v in value]
    except (TypeError, ValueError):
        return False
    return (bool(scales) and scales[0] == 1 and len(set(scales)) == len(scales)
            and all(s >= 1 for s in scales) and all(int(v) == v for v in value))


def _unset_or(check: Any) -> Any:
    return lambda v: v is None or check(v)


@dataclass
class Options:
    """``distill.sdd.*``"""

    scales: List[int] = option([1, 2, 4], "the scales M: each s splits the last feature map into s x s "
                                          "regions (from its 4x4 adaptive pooling); the first must be "
                                          "1, the global region the others are compared with. The "
                                          "authors use [1,2] for resnet32x4->resnet8x4 and vgg13->vgg8",
                               _scales_ok, "a list of distinct positive integers starting with 1")
    temperature: float = option(4.0, "temperature T of each region's KD (or DKD)", **positive())
    inconsistent_weight: float = option(2.0, "weight of a region whose teacher prediction is right where "
                                             "the teacher's global one is wrong, or the reverse (others: 1)",
                                        **non_negative())
    logit_loss: str = option("kd", "the loss per region: kd (SDD-KD) or dkd (SDD-DKD)",
                             lambda v: v in LOGIT_LOSSES, f"one of {', '.join(LOGIT_LOSSES)}")
    ce_weight: Optional[float] = option(None, "cross-entropy weight; unset: the authors' (0.1 with kd, 1 "
                                              "with dkd)", _unset_or(lambda v: v >= 0), ">= 0 or null")
    weight: Optional[float] = option(None, "weight of the SDD term; unset: the authors' (0.9 with kd, 1 "
                                           "with dkd)", _unset_or(lambda v: v >= 0), ">= 0 or null")
    warmup_epochs: Optional[float] = option(None, "epochs of linear warm-up of the SDD term (as DKD's); "
                                                  "unset: the authors' (none with kd, 20 with dkd)",
                                            _unset_or(lambda v: v >= 0), ">= 0 or null")
    alpha: float = option(1.0, "dkd only: weight of the target-class term TCKD", **non_negative())
    beta: float = option(8.0, "dkd only: weight of the non-target-class term NCKD (the authors' "
                              "configs: 2 for resnet56/110 teachers, 6 for VGG and WRN pairs)",
                         **non_negative())


# ----------------------------------------------------------------------------- regions
def region_matrix(height: int, width: int, scales: Any, grid: int = GRID) -> Any:
    """``(N, height * width)`` weights: row r averages the map's pixels (row-major) into region r,
    the scales in order, each s x s row-major, pooled from the map's ``grid`` x ``grid`` adaptive
    pooling as the authors' SPP (a scale above ``grid`` pools the map to that size first).
    Scales ``[1]``: the global average."""
    import numpy as np

    from tfkd.distill.methods.reviewkd import pooling_matrix

    scales = [int(s) for s in scales]
    if scales == [1]:
        return np.full((1, height * width), 1.0 / (height * width), np.float32)
    grid = max(grid, *scales)
    rows, cols = pooling_matrix(height, grid).astype(np.float64), pooling_matrix(width, grid).astype(np.float64)
    blocks = []
    for s in scales:
        r = pooling_matrix(grid, s).astype(np.float64) @ rows  # (s, height)
        c = pooling_matrix(grid, s).astype(np.float64) @ cols  # (s, width)
        blocks.append(np.kron(r, c))  # [i * s + j, h * width + w] = r[i, h] c[j, w]
    return np.concatenate(blocks).astype(np.float32)


#: Layers the classifier may apply to the pooled vector after the pooling (applied per region).
_VECTOR_LAYERS = ("Dense", "Dropout", "Activation", "Identity", "LogProbabilities")


def _history(tensor: Any) -> tuple[Any, int, int]:
    history = tensor._keras_history
    return history.operation, history.node_index, history.tensor_index


def _same(a: Any, b: Any) -> bool:
    """Whether two symbolic tensors are one: the same tensor, or outputs of one call of a nested
    model that returns the same inner tensor twice (a tapped backbone: its output and its last tap)."""
    if a is b:
        return True
    (op_a, node_a, i_a), (op_b, node_b, i_b) = _history(a), _history(b)
    if op_a is not op_b or node_a != node_b:
        return False
    if i_a == i_b:
        return True
    outputs = getattr(op_a, "outputs", None)
    if not isinstance(outputs, (list, tuple)) or max(i_a, i_b) >= len(outputs):
        return False
    return _same(outputs[i_a], outputs[i_b])


def classifier_of(model: Any) -> tuple[int, list[Any]]:
    """(the index in ``features`` of the map the model's head average-pools, the head's layers
    after the pooling, the dense ``logits`` layer among them). ``ModelError`` naming the model
    when its logits do not come from a global average pooling of one of its feature outputs."""
    import keras

    from tfkd.errors import ModelError
    from tfkd.models.wrap import unwrap

    inner = unwrap(model)
    outputs = getattr(inner, "output", None)
    why = (f"sdd applies {model.name}'s classifier to pooled regions of the feature map its head "
           "average-pools")
    if not isinstance(outputs, dict) or "logits" not in outputs or not outputs.get("features"):
        raise ModelError(f"{why}, but it has no logits and feature outputs to read them from")
    tensor, chain = outputs["logits"], []
    for _ in range(len(inner.layers) + 2):
        layer, node_index, _ = _history(tensor)
        kind = type(layer).__name__
        if isinstance(layer, keras.layers.GlobalAveragePooling2D):
            if layer.keepdims or layer.data_format != "channels_last":
                raise ModelError(f"{why}; its pooling {layer.name!r} keeps the spatial axes or is "
                                 "channels-first, which sdd does not read")
            pooled = layer._inbound_nodes[node_index].input_tensors[0]
            break
        if kind not in _VECTOR_LAYERS:
            raise ModelError(f"{why}, but between its logits and a global average pooling it has "
                             f"{layer.name!r} ({kind}); sdd reads heads of a GlobalAveragePooling2D "
                             f"followed by {', '.join(_VECTOR_LAYERS)} layers")
        chain.insert(0, layer)
        inputs = layer._inbound_nodes[node_index].input_tensors
        if len(inputs) != 1:
            raise ModelError(f"{why}, but its head layer {layer.name!r} takes {len(inputs)} inputs")
        tensor = inputs[0]
    else:
        raise ModelError(f"{why}, but no global average pooling was found before its logits")
    features = outputs["features"]
    found = [i for i, f in enumerate(features) if _same(f, pooled)]
    if not found:
        raise ModelError(f"{why}, but the map its head pools (the output of {_history(pooled)[0].name!r}) is "
                         "not one of its feature outputs: tap that layer as the last stage "
                         "(distill.teacher_layers / distill.student_layers)")
    shape = tuple(features[found[-1]].shape)
    if len(shape) != 4 or shape[1] is None or shape[2] is None:
        raise ModelError(f"{why}, but that map's size is not fixed ({shape})")
    return found[-1], chain


def region_logits(model_outputs: dict[str, Any], index: int, chain: list[Any], matrix: Any) -> Any:
    """``(B, N, classes)`` float32: the model's classifier on each region of its ``index``-th map."""
    from keras import ops

    fmap = model_outputs["features"][index]
    shape = ops.shape(fmap)
    flat = ops.reshape(fmap, (shape[0], shape[1] * shape[2], shape[3]))
    pooled = ops.einsum("rk,bkc->brc", ops.convert_to_tensor(matrix, flat.dtype), flat)
    x = ops.reshape(pooled, (-1, shape[3]))
    for layer in chain:
        x = layer(x, training=False)
    x = ops.cast(x, "float32")
    return ops.reshape(x, (shape[0], matrix.shape[0], ops.shape(x)[-1]))


def sdd_loss(teacher_regions: Any, student_regions: Any, labels: Any, temperature: float,
             inconsistent_weight: float = 2.0, logit_loss: str = "kd", alpha: float = 1.0,
             beta: float = 8.0) -> Any:
    """``sum_{b, r} w[b, r] l[b, r] / (N B)`` of ``(B, N, classes)`` region logits, region 0 the
    global one (see the module docstring)."""
    from keras import ops

    from tfkd.distill.methods.dkd import dkd_per_example

    batch, regions, classes = (ops.shape(student_regions)[i] for i in range(3))
    t = ops.reshape(teacher_regions, (-1, classes))
    s = ops.reshape(student_regions, (-1, classes))
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    per_row = ops.reshape(ops.repeat(ops.expand_dims(labels, 1), regions, axis=1), (-1,))
    if logit_loss == "dkd":
        loss = dkd_per_example(t, s, per_row, alpha, beta, temperature)
    else:
        log_t = ops.log_softmax(t / temperature, axis=-1)
        log_s = ops.log_softmax(s / temperature, axis=-1)
        loss = temperature**2 * ops.sum(ops.exp(log_t) * (log_t - log_s), axis=-1)
    loss = ops.reshape(loss, (batch, regions))
    right = ops.equal(ops.cast(ops.argmax(teacher_regions, axis=-1), "int32"), ops.expand_dims(labels, 1))
    disagree = ops.not_equal(right, right[:, :1])
    weights = ops.where(disagree, float(inconsistent_weight), 1.0)
    return ops.mean(ops.cast(weights, loss.dtype) * loss)


class SDD(LogitTerm):
    """The SDD term: the per-region KD (or DKD) of both models' classifiers on their last maps."""

    name = "sdd"

    def __init__(self, weight: float, temperature: float, scales: Any, inconsistent_weight: float = 2.0,
                 logit_loss: str = "kd", alpha: float = 1.0, beta: float = 8.0, warmup_epochs: float = 0.0,
                 steps_per_epoch: int = 1, teacher: str = "teacher") -> None:
        super().__init__(weight, teacher, temperature)
        self.scales = [int(s) for s in scales]
        self.inconsistent_weight, self.logit_loss = float(inconsistent_weight), str(logit_loss)
        self.alpha, self.beta = float(alpha), float(beta)
        self.warmup_epochs, self.steps_per_epoch = float(warmup_epochs), int(steps_per_epoch)

    def build(self, ctx: Any) -> None:
        self.heads = {}
        for role, model in (("student", ctx.student), ("teacher", ctx.teacher(self.teacher))):
            index, chain = classifier_of(model)
            height, width = (int(d) for d in model.output["features"][index].shape[1:3])
            self.heads[role] = (index, chain, region_matrix(height, width, self.scales))
        # the classifiers are the models' own (the student's trains with the student): no layers here

    def regions(self, batch: Any) -> tuple[Any, Any]:
        """(teacher, student) region logits ``(B, N, classes)``, standardized when asked."""
        from keras import ops

        from tfkd import losses

        t = ops.stop_gradient(region_logits(batch.teachers[self.teacher], *self.heads["teacher"]))
        s = region_logits(batch.student, *self.heads["student"])
        if self.standardize:
            t, s = losses.standardize(t), losses.standardize(s)
        return t, s

    def compute(self, batch: Any) -> Any:
        t, s = self.regions(batch)
        return sdd_loss(t, s, batch.labels, self.temperature, self.inconsistent_weight, self.logit_loss,
                        self.alpha, self.beta)

    def weight_at(self, step: Any) -> Any:
        return linear_warmup(self.weight, self.warmup_epochs, self.steps_per_epoch, step)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "scales": list(self.scales), "inconsistent_weight": self.inconsistent_weight,
                "logit_loss": self.logit_loss, "alpha": self.alpha, "beta": self.beta,
                "warmup_epochs": self.warmup_epochs}


def terms(options: Options, run: Any) -> list[Any]:
    """CE and SDD, with the authors' weights of the chosen per-region loss unless set."""
    from tfkd.distill.terms import CrossEntropy

    ce, weight, warmup = AUTHORS[options.logit_loss]
    ce = ce if options.ce_weight is None else options.ce_weight
    weight = weight if options.weight is None else options.weight
    warmup = warmup if options.warmup_epochs is None else options.warmup_epochs
    return [CrossEntropy(ce), SDD(weight, options.temperature, list(options.scales), options.inconsistent_weight,
                                 options.logit_loss, options.alpha, options.beta, warmup, run.steps_per_epoch)]
