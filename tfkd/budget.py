"""The accuracy budget of a quantized file: repair it by keeping the fewest ops in float.

``search`` is told how to build the file with some ops kept in float (``build(ops)``), how
to score a built file (``score(file)``: top-1 on the validation split, never the test split),
the float model's score, the budget in points of top-1, and a ranking of the file's quantized
tensors (worst first: ``tfkd.quantize``'s quantization noise per tensor), each with the ops
that must compute in float for it never to be quantized (its producer and its consumers). It
keeps the first k tensors of the ranking in float for k = 1, 2, 4, ... until the file is
within the budget, then narrows k down by bisection between the last k that missed and the
first that held, so the number of builds grows with the logarithm of the tensor count. It
never keeps more than ``MAX_FLOAT_SHARE`` of the tensors in float: past that the file would
be a float model under a quantized name. Every build it tried is recorded. A file that still
misses the budget is returned flagged (the best one it built), never passed off as fine.

Plain Python: the builds and scores are the caller's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

#: The largest share of a file's quantized tensors the repair keeps in float.
MAX_FLOAT_SHARE = 0.5


@dataclass
class Repair:
    """What the search did to one quantized file."""

    reference_top1: float
    budget_pt: float
    top1: float  # of the file kept
    kept_float: list[str] = field(default_factory=list)  # tensors never quantized
    float_ops: list[str] = field(default_factory=list)  # the ops computing in float for them
    tried: list[dict[str, Any]] = field(default_factory=list)  # {"kept": k, "top1": ...} per build
    candidates: int = 0

    @property
    def drop_pt(self) -> float:
        """Points of top-1 the kept file loses against the float model."""
        return (self.reference_top1 - self.top1) * 100.0

    @property
    def within_budget(self) -> bool:
        """True when the kept file loses at most ``budget_pt`` points."""
        return self.drop_pt <= self.budget_pt + 1e-9

    def record(self) -> dict[str, Any]:
        """The search as plain data (the model card's ``budget`` entry)."""
        return {**asdict(self), "drop_pt": self.drop_pt, "within_budget": self.within_budget}


def search(build: Callable[[Sequence[str]], Any], score: Callable[[Any], float], reference: float,
           budget_pt: float, ranking: Callable[[Any], Sequence[Any]],
           log: Callable[[str], None] = lambda message: None) -> tuple[Any, Repair]:
    """(the file to keep, what was done). ``build(())`` is the fully quantized file; when it
    misses the budget, ``ranking(that file)`` lists its tensors, worst first, each an object
    with ``tensor`` (a name) and ``ops`` (the names of the ops to keep in float for it)."""
    first = build(())
    top1 = score(first)
    repair = Repair(reference, budget_pt, top1, tried=[{"kept": 0, "top1": top1}])
    if repair.within_budget:
        return first, repair
    ranked = list(ranking(first))
    repair.candidates = len(ranked)
    limit = max(1, int(len(ranked) * MAX_FLOAT_SHARE)) if ranked else 0
    log(f"{(reference - top1) * 100:.2f} pt below the float model on validation, over the "
        f"{budget_pt:g}-pt budget: keeping the noisiest of its {len(ranked)} quantized tensors in "
        f"float (at most {limit})")
    built: dict[int, tuple[Any, float]] = {0: (first, top1)}

    def ops_of(k: int) -> list[str]:
        return list(dict.fromkeys(op for c in ranked[:k] for op in c.ops))

    def attempt(k: int) -> bool:
        if k not in built:
            file = build(ops_of(k))
            built[k] = (file, score(file))
            repair.tried.append({"kept": k, "ops": len(ops_of(k)), "top1": built[k][1]})
            log(f"{k} tensor(s) in float ({len(ops_of(k))} ops): validation top-1 {built[k][1]:.2%}")
        return (reference - built[k][1]) * 100.0 <= budget_pt + 1e-9

    low, high, k = 0, None, 1  # low: the largest k known to miss; high: the smallest that holds
    while limit and high is None:
        k = min(k, limit)
        if attempt(k):
            high = k
        else:
            low = k
            if k == limit:
                break
            k *= 2
    while high is not None and high - low > 1:
        middle = (low + high) // 2
        if attempt(middle):
            high = middle
        else:
            low = middle
    chosen = high if high is not None else max(built, key=lambda n: (built[n][1], -n))
    repair.kept_float = [c.tensor for c in ranked[:chosen]]
    repair.float_ops = ops_of(chosen)
    repair.top1 = built[chosen][1]
    return built[chosen][0], repair
