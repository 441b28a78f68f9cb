"""Mixed precision: Keras dtype policies, float32 where numbers must be exact, float32 artifacts.

``mixed_precision`` (``float32``, ``mixed_bfloat16`` or ``mixed_float16``) is the Keras global
dtype policy while a run builds and trains its models: layers compute in 16 bits and keep
float32 variables. What must stay exact stays float32: model outputs are cast before any loss
(``float32``), the terms' own layers (adapters, discriminators, embeddings) are built under a
float32 policy (``policy_scope``), metrics are float32, and ``mixed_float16`` scales the loss
(Keras wraps the optimizer in a ``LossScaleOptimizer``; ``apply_gradients`` below keeps several
optimizers of one step consistent). Saved models are always float32 (``with_policy``), so exports
and later runs never see a 16-bit layer.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

from tfkd.config import POLICIES  # noqa: F401 - the choices, checked with the config


@contextlib.contextmanager
def policy_scope(name: str) -> Iterator[None]:
    """Keras's global dtype policy is ``name`` inside the block, and what it was after."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def float32(structure: Any) -> Any:
    """Every floating tensor of a nested structure (a model's output dict) cast to float32."""
    import tensorflow as tf

    def cast(x: Any) -> Any:
        if isinstance(x, (tf.Tensor, tf.Variable)) and x.dtype.is_floating and x.dtype != tf.float32:
            return tf.cast(x, tf.float32)
        return x

    return tf.nest.map_structure(cast, structure)


def _replace_policies(config: Any, name: str) -> Any:
    """A serialized model's config with every layer's dtype policy set to ``name``."""
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy" and isinstance(config.get("config"), dict):
            return {**config, "config": {**config["config"], "name": name}}
        return {k: _replace_policies(v, name) for k, v in config.items()}
    if isinstance(config, list):
        return [_replace_policies(v, name) for v in config]
    return config


def policies(model: Any) -> set[str]:
    """The dtype policies of every layer of ``model`` (nested models opened)."""
    layers = [model, *getattr(model, "_flatten_layers", lambda **_: [])(include_self=False, recursive=True)]
    return {layer.dtype_policy.name for layer in layers if getattr(layer, "dtype_policy", None) is not None}


def with_policy(model: Any, name: str = "float32") -> Any:
    """``model`` rebuilt with every layer under the dtype policy ``name`` and the same weights
    (``model`` itself when that is already so). Works for nested and subclassed tfkd models:
    the serialized config is rewritten, not the layers."""
    import keras

    if policies(model) <= {name}:
        return model
    config = _replace_policies(keras.saving.serialize_keras_object(model), name)
    with policy_scope(name):
        rebuilt = keras.saving.deserialize_keras_object(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def apply_gradients(tape: Any, loss: Any, groups: Sequence[tuple[Any, list[Any]]]) -> None:
    """One optimizer step for each (optimizer, variables) group from one loss.

    The loss (recorded on ``tape``, which keeps recording the scaling) is scaled by the first
    optimizer (a ``LossScaleOptimizer`` under ``mixed_float16``; unchanged otherwise) and
    differentiated once; another group's gradients
    are brought to its own optimizer's scale, so each unscales (and skips a non-finite step)
    itself. Variables without a gradient are left out.
    """
    first = groups[0][0]
    variables = [v for _, group in groups for v in group]
    with tape:  # the scaling is part of what is differentiated
        scaled = first.scale_loss(loss)
    gradients = tape.gradient(scaled, variables)
    start = 0
    for optimizer, group in groups:
        grads = gradients[start:start + len(group)]
        start += len(group)
        if optimizer is not first:
            ratio = optimizer.scale_loss(1.0) / first.scale_loss(1.0)
            grads = [None if g is None else g * ratio for g in grads]
        pairs = [(g, v) for g, v in zip(grads, group) if g is not None]
        if pairs:
            optimizer.apply_gradients(pairs)
