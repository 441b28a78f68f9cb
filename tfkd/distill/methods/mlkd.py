"""``mlkd``: multi-level logit distillation (Jin, Wang & Lin, CVPR 2023, "Multi-Level Logit
Distillation"), as its authors' code computes it (Jin-Ying/Multi-Level-Logit-Distillation,
``mdistiller/distillers/KD_ours.py``, with the strong view of ``mdistiller/dataset/cifar100.py``).

Every batch comes in two views: the weak one (the usual crop and flip) and a strong one (its own
crop and flip, then RandAugment with 2 ops and Cutout: ``data.strong_view``,
``tfkd.data.transforms.strong_batch``). The student and the teacher each run on both views, a
forward pass per view (batch norm normalizes each by its own statistics; the teacher in
inference mode). With ``p^T = softmax(z / T)`` and the temperatures ``T`` in (4, 3, 5, 2, 6):

- ``kd(s, t, T) = T^2 mean_b sum_k p_t^T (log p_t^T - log p_s^T)`` (instance level);
- ``cc(s, t, T) = sum((P_t^T' P_t^T - P_s^T' P_s^T)^2) / C``, the C x C class correlation;
- ``bc(s, t, T) = sum((P_t^T P_t^T' - P_s^T P_s^T')^2) / B``, the B x B batch correlation;
- the confidence mask: an example whose teacher's weak-view top probability (temperature 1) is
  at most the batch median (NumPy's 50th percentile, interpolated); the class mask: a class
  whose teacher's weak-view probability summed over the batch is at most the median over the
  classes.

The loss is ``ce_weight (CE(weak) + CE(strong))`` (term ``ce_views``, logged ``ce`` is the weak
view's alone, as for every method) plus, each times ``kd_weight``:

- ``mlkd_kd``: ``sum_T kd(weak, T) mean(conf mask) + sum_T kd(strong, T)``;
- ``mlkd_cc``: ``sum_T cc(weak, T) mean(class mask)``;
- ``mlkd_bc``: ``sum_T bc(weak, T) mean(conf mask)``.

The masks multiply losses the authors' functions already reduced to scalars, so
``(loss * mask).mean()`` is the loss times the fraction of the batch (of the classes) the mask
keeps: that is what is computed here, not a per-example selection. Their code also computes the
strong view's cc and bc and adds neither to the loss; neither is computed here.

A quirk kept from the code: in the strong-view KD sum, the terms at temperatures 2 and 6 read
the weak-view logits (``kd(weak, 2) + kd(weak, 6)``, unmasked), not the strong ones; the paper's
formula reads the strong view at every temperature (``strong_weak_temperatures=[]``).

Batch statistics (the medians, the class sums, the B x B correlation) are over the global
batch under MirroredStrategy (``terms.global_batch``), so two replicas compute what one device
does. Defaults are the authors' CIFAR-100 config (``CFG.KD``: T 4, CE weight 0.1, KD weight 0.9;
their ``configs/cifar100/ours/*.yaml`` train at LR 0.025 with batch 64). ``mlkd+ls`` is refused:
its terms take every temperature of the list, not the one logit standardization sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List

from tfkd.distill.terms import Term
from tfkd.options import non_negative, option

NAME = "mlkd"
SUMMARY = ("0.1 CE on a weak and a strong view + 0.9 (instance KD, class- and batch-correlation "
           "losses at T 4,3,5,2,6, confidence-masked)")

DEFAULT_TEMPERATURES = [4.0, 3.0, 5.0, 2.0, 6.0]


@dataclass
class Options:
    """``distill.mlkd.*``"""

    temperatures: List[float] = option(list(DEFAULT_TEMPERATURES), "temperatures each level's loss is "
                                       "summed over (the authors': 4, 3, 5, 2, 6)",
                                       lambda v: len(v) > 0 and all(t > 0 for t in v),
                                       "a non-empty list of temperatures > 0")
    ce_weight: float = option(0.1, "weight of the cross-entropy, on each view", **non_negative())
    kd_weight: float = option(0.9, "weight of each temperature's instance, class and batch loss",
                              **non_negative())
    strong_weak_temperatures: List[float] = option(
        [2.0, 6.0], "temperatures whose term of the strong-view KD sum reads the weak view's "
                    "logits, as the authors' code does at 2 and 6; []: the strong view at every one",
        lambda v: all(t > 0 for t in v), "a list of temperatures > 0")


# ----------------------------------------------------------------------------- the formulas
def kd_loss(teacher_logits: Any, student_logits: Any, temperature: float) -> Any:
    """``T^2 mean_b KL(p_t^T || p_s^T)``."""
    from tfkd import losses

    return losses.kd(teacher_logits, student_logits, temperature)


def class_correlation(teacher_logits: Any, student_logits: Any, temperature: float) -> Any:
    """``sum((P_t' P_t - P_s' P_s)^2) / C`` of the temperature softmaxes (rows: examples)."""
    from keras import ops

    p_s = ops.softmax(student_logits / temperature, axis=-1)
    p_t = ops.softmax(teacher_logits / temperature, axis=-1)
    gap = ops.matmul(ops.transpose(p_t), p_t) - ops.matmul(ops.transpose(p_s), p_s)
    return ops.sum(ops.square(gap)) / ops.cast(ops.shape(p_s)[-1], p_s.dtype)


def batch_correlation(teacher_logits: Any, student_logits: Any, temperature: float) -> Any:
    """``sum((P_t P_t' - P_s P_s')^2) / B`` of the temperature softmaxes (rows: examples)."""
    from keras import ops

    p_s = ops.softmax(student_logits / temperature, axis=-1)
    p_t = ops.softmax(teacher_logits / temperature, axis=-1)
    gap = ops.matmul(p_t, ops.transpose(p_t)) - ops.matmul(p_s, ops.transpose(p_s))
    return ops.sum(ops.square(gap)) / ops.cast(ops.shape(p_s)[0], p_s.dtype)


def median(values: Any) -> Any:
    """The median of a 1-D tensor as ``np.percentile(values, 50)`` takes it (the mean of the
    two middle values of an even count)."""
    from keras import ops

    ordered = ops.sort(values)
    n = ops.shape(values)[0]
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def masks(teacher_logits: Any) -> tuple[Any, Any]:
    """(fraction of the examples the confidence mask keeps, fraction of the classes the class
    mask keeps), from the teacher's weak-view logits of the whole batch."""
    from keras import ops

    p = ops.stop_gradient(ops.softmax(teacher_logits, axis=-1))
    confidence = ops.max(p, axis=-1)
    by_class = ops.sum(p, axis=0)
    kept = ops.mean(ops.cast(confidence <= median(confidence), p.dtype))
    kept_classes = ops.mean(ops.cast(by_class <= median(by_class), p.dtype))
    return kept, kept_classes


def mlkd_parts(teacher_weak: Any, student_weak: Any, teacher_strong: Any, student_strong: Any,
               temperatures: List[float], strong_weak_temperatures: List[float] = (),
               gather: Any = None) -> dict[str, Any]:
    """The unweighted ``kd``, ``cc`` and ``bc`` sums of the module docstring. ``gather``
    (``terms.global_batch``): the batch statistics over the global batch."""
    from keras import ops

    gather = gather or (lambda x: x)
    t_all, s_all = gather(teacher_weak), gather(student_weak)
    kept, kept_classes = masks(t_all)
    weak_views = {float(t) for t in strong_weak_temperatures}
    kd = ops.zeros((), student_weak.dtype)
    cc = ops.zeros((), student_weak.dtype)
    bc = ops.zeros((), student_weak.dtype)
    for temperature in temperatures:
        kd = kd + kd_loss(teacher_weak, student_weak, temperature) * kept
        if float(temperature) in weak_views:
            kd = kd + kd_loss(teacher_weak, student_weak, temperature)
        else:
            kd = kd + kd_loss(teacher_strong, student_strong, temperature)
        cc = cc + class_correlation(t_all, s_all, temperature) * kept_classes
        bc = bc + batch_correlation(t_all, s_all, temperature) * kept
    return {"kd": kd, "cc": cc, "bc": bc}


# ----------------------------------------------------------------------------- the terms
class TwoViewCrossEntropy(Term):
    """``CE(weak) + CE(strong)`` of the student's logits with the labels."""

    name, slot = "ce_views", "ce"
    needs_strong_view = True

    def compute(self, batch: Any) -> Any:
        from tfkd import losses

        return (losses.cross_entropy(batch.labels, batch.student["logits"])
                + losses.cross_entropy(batch.labels, batch.student_strong["logits"]))


class MultiLevel(Term):
    """One level of MLKD (``part``: ``kd`` instance, ``cc`` class, ``bc`` batch); the three
    share one computation per batch."""

    needs_strong_view = True

    def __init__(self, part: str, weight: float, temperatures: List[float],
                 strong_weak_temperatures: List[float], teacher: str = "teacher") -> None:
        super().__init__(weight, teacher)
        self.part = part
        self.name = f"mlkd_{part}"
        self.slot = "logit" if part == "kd" else self.name
        self.temperatures = [float(t) for t in temperatures]
        self.strong_weak_temperatures = [float(t) for t in strong_weak_temperatures]

    def compute(self, batch: Any) -> Any:
        from tfkd.distill.terms import global_batch

        key = ("mlkd", self.teacher, tuple(self.temperatures), tuple(self.strong_weak_temperatures))
        parts = batch.cached(key, lambda: mlkd_parts(
            batch.teachers[self.teacher]["logits"], batch.student["logits"],
            batch.teachers_strong[self.teacher]["logits"], batch.student_strong["logits"],
            self.temperatures, self.strong_weak_temperatures, global_batch))
        return parts[self.part]

    def config(self) -> dict[str, Any]:
        return {**super().config(), "temperatures": self.temperatures,
                "strong_weak_temperatures": self.strong_weak_temperatures}


def terms(options: Options, run: Any) -> list[Any]:
    """The two views' CE and the three levels."""
    return [TwoViewCrossEntropy(options.ce_weight)] + [
        MultiLevel(part, options.kd_weight, options.temperatures, options.strong_weak_temperatures)
        for part in ("kd", "cc", "bc")]
