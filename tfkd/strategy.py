"""Choosing the ``tf.distribute`` strategy and the worker's role.

``auto`` picks MultiWorkerMirroredStrategy when ``TF_CONFIG`` describes a cluster,
MirroredStrategy when more than one GPU is visible, and the default (one-device) strategy
otherwise. Only the chief writes artifacts; other workers write to a scratch folder.
"""

from __future__ import annotations

import json
import os
from typing import Any

import tensorflow as tf

from tfkd.errors import ConfigError


class MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy whose ``reduce`` accepts what Keras 3's ``fit`` passes it.

    Keras 3 has two multi-worker-only calls that the stock strategy rejects
    (keras-team/keras#20585): it reduces the first ``(images, labels)`` batch with one
    ``reduce`` call (the strategy reduces one value, not a structure), and it reduces every
    logged scalar with ``axis=0`` (a scalar has no axis 0). This reduces leaf by leaf and
    reduces scalars across replicas without an axis, which is what both calls mean.
    """

    def reduce(self, reduce_op: Any, value: Any, axis: Any = None) -> Any:
        base = tf.distribute.MultiWorkerMirroredStrategy.reduce

        def reduce_leaf(leaf: Any) -> Any:
            local = self.experimental_local_results(leaf)[0]
            scalar = getattr(getattr(local, "shape", None), "rank", None) == 0
            return base(self, reduce_op, leaf, None if scalar else axis)

        return tf.nest.map_structure(reduce_leaf, value)


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """Builds the strategy ``name`` (auto, default, mirrored, multiworker).

    Must run before any other TensorFlow op in the process when it is ``multiworker``.
    """
    if name == "auto":
        if os.environ.get("TF_CONFIG"):
            name = "multiworker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise ConfigError("strategy 'multiworker' needs TF_CONFIG describing the cluster "
                              "(see README, 'Training on several machines')")
        try:
            json.loads(os.environ["TF_CONFIG"])
        except json.JSONDecodeError:
            raise ConfigError("TF_CONFIG: not valid JSON") from None
        return MultiWorkerStrategy()
    raise ConfigError(f"option 'strategy' = {name!r}: expected auto, default, mirrored or multiworker")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes artifacts: always, except non-chief multi-worker tasks."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type is None or task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def task_name(strategy: tf.distribute.Strategy) -> str:
    """``<type>-<index>`` of this multi-worker task (``chief-0`` outside multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return "chief-0"
    return f"{resolver.task_type}-{resolver.task_id}"
