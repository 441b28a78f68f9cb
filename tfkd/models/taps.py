"""Taps: any functional Keras classifier as a tfkd model, ``{"logits", "features", "preact"}``.

The distillation terms read a model's logits and one feature map per stage (shallow to deep). A
zoo model returns them; a user's classifier (a ``keras.applications`` network with a new head,
a fine-tuned model saved as ``.keras``) returns only its class scores. ``tap`` rebuilds such a
model as a functional model over the *same* layers whose outputs are the tensors it computes
anyway: its logits and the feature maps of chosen layers (the taps). Nothing is recomputed and
no weight is copied.

Which layers: named ones (``distill.teacher_layers`` / ``distill.student_layers``), or by
default the last layer at each spatial resolution of the network's main path, from the first
convolution on (padding layers, which only border a map for the next convolution, and
squeeze-and-excitation maps smaller than the final one are not stages).

The scores: logits when the last layer has no activation; when it ends in a softmax (the default
of ``keras.applications`` classifiers) the softmax's input is taken where it is a tensor of the
graph (an ``Activation``/``Softmax`` layer) and ``log(p)`` otherwise (a ``Dense`` layer with a
softmax inside: the logits up to a per-example constant, which no softmax-based term sees).
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
from keras.src.models.functional import Functional

from tfkd.errors import ModelError
from tfkd.models.wrap import OUTPUT_CHOICES

#: Layers that border or reshape a map without computing a feature: never a stage's output.
_NOT_STAGES = ("ZeroPadding2D", "Cropping2D", "InputLayer", "Rescaling", "Normalization", "Resizing")
#: Layers that start a classifier head: the stages end before them.
_HEAD_STARTS = ("GlobalAveragePooling2D", "GlobalMaxPooling2D", "Flatten")
#: Layers whose output is a new feature map: the main path starts at the first of them (or at
#: a nested model, such as ConvNeXt's stem).
_COMPUTES = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D")


def _is_graph(layer: Any) -> bool:
    return isinstance(layer, (Functional, keras.Sequential))


def _layer_graph(model: Any, path: str) -> None:
    """Refuses, in one line, a model tfkd cannot tap: subclassed, never built, not one image input."""
    inputs = None
    if _is_graph(model):
        try:
            inputs = model.inputs
            model.output  # noqa: B018 - a Sequential never called has none
        except (AttributeError, ValueError):
            raise ModelError(f"{path}: not a tfkd teacher, nor a classifier with a layer graph tfkd "
                             "can tap (a model never built or called)") from None
    if not inputs:
        raise ModelError(
            f"{path}: a subclassed model with no layer graph ({type(model).__name__}): tfkd reads "
            "its logits and feature maps from the layers, so save it as a functional model "
            "(keras.Model(inputs, outputs) over the same layers) and pass that")
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise ModelError(f"{path}: expected a model with one image input (N, H, W, C), found "
                         f"{[tuple(i.shape) for i in inputs]}")


def _scores(model: Any) -> Any:
    """The model's class-score tensor (its only output, or the ``logits`` of a dict)."""
    output = model.output
    if isinstance(output, dict):
        if "logits" not in output:
            raise ModelError(f"{model.name}: a model with outputs {sorted(output)} has no 'logits'")
        return output["logits"]
    if isinstance(output, (list, tuple)):
        if len(output) != 1:
            raise ModelError(f"{model.name}: expected one output (the class scores), found {len(output)}")
        output = output[0]
    if len(output.shape) != 2:
        raise ModelError(f"{model.name}: expected class scores of shape (N, classes), found "
                         f"{tuple(output.shape)}")
    return output


def _producer(tensor: Any) -> Any:
    """The layer (operation) that computed a symbolic tensor."""
    return tensor._keras_history.operation


def _activation_name(layer: Any) -> str:
    kind = type(layer).__name__
    if kind == "Softmax":
        return "softmax"
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", "") if activation is not None else ""


def output_kind(model: Any) -> tuple[str, str]:
    """(``logits`` or ``probabilities``, why): read from the layer that computes the scores."""
    layer = _producer(_scores(model))
    name = _activation_name(layer)
    if name == "softmax":
        return "probabilities", f"its last layer {layer.name!r} ends in a softmax"
    if name == "sigmoid":
        raise ModelError(f"{model.name}: its last layer {layer.name!r} ends in a sigmoid (multi-label "
                         "scores): tfkd distills single-label classifiers (softmax or logits)")
    return "logits", f"its last layer {layer.name!r} has {'no' if name in ('', 'linear') else name} activation"


def logits_tensor(model: Any, kind: str = "auto") -> tuple[Any, str]:
    """The tensor of the model's logits and how it was found (``kind``: ``OUTPUT_CHOICES``)."""
    if kind not in OUTPUT_CHOICES:
        raise ModelError(f"teacher_output = {kind!r}: expected one of {', '.join(OUTPUT_CHOICES)}")
    scores = _scores(model)
    how = ""
    if kind == "auto":
        kind, how = output_kind(model)
    if kind == "logits":
        return scores, how or "told: logits"
    layer, node_index, _ = scores._keras_history
    if type(layer).__name__ in ("Softmax", "Activation") and _activation_name(layer) == "softmax":
        softmax_input = layer._inbound_nodes[node_index].input_tensors[0]  # in this graph, not the layer's first
        return softmax_input, f"{how or 'told: probabilities'}; the softmax's input is the logits"
    return (LogProbabilities(name="logits_from_probabilities")(scores),
            f"{how or 'told: probabilities'}; logits = log(p) (up to a per-example constant)")


@keras.saving.register_keras_serializable(package="tfkd")
class LogProbabilities(keras.layers.Layer):
    """``log(max(p, 1e-30))``: logits (up to a per-example constant) from probabilities."""

    def call(self, probabilities: Any) -> Any:
        return keras.ops.log(keras.ops.maximum(probabilities, 1e-30))


def _spatial(tensor: Any) -> tuple[int, int] | None:
    shape = getattr(tensor, "shape", None)
    if shape is None or len(shape) != 4 or shape[1] is None or shape[2] is None:
        return None
    return int(shape[1]), int(shape[2])


def _head_input(model: Any) -> Any:
    """The feature map the classifier head pools: walking back from the scores along each
    layer's first input to the last global pooling (or flattening); None if there is none. A
    network without a head (``include_top=False``) pools its output."""
    output = model.output
    if not isinstance(output, (dict, list, tuple)) and _spatial(output) is not None:
        return output
    tensor, flattened = _scores(model), None
    for _ in range(len(model.layers) + 1):
        operation, node_index, _ = tensor._keras_history
        inputs = operation._inbound_nodes[node_index].input_tensors
        if not inputs:
            break
        kind = type(operation).__name__
        if kind in _HEAD_STARTS and kind != "Flatten":
            return inputs[0]
        if kind == "Flatten" and flattened is None:
            flattened = inputs[0]
        tensor = inputs[0]
    return flattened


def default_taps(model: Any) -> list[Any]:
    """The last layer at each spatial resolution of the main path, shallow to deep, up to the
    feature map the head pools (squeeze-and-excitation maps, smaller than it, are not stages)."""
    head_input = _head_input(model)
    layers = list(model.layers)
    if head_input is not None and _producer(head_input) in layers:
        layers = layers[: layers.index(_producer(head_input)) + 1]
    started, last_at = False, {}
    for layer in layers:
        kind = type(layer).__name__
        if not started:
            started = kind in _COMPUTES or _is_graph(layer)
            if not started:
                continue
        if kind in _NOT_STAGES:
            continue
        size = _spatial(getattr(layer, "output", None))
        if size is not None:
            last_at.pop(size, None)  # re-insert: dict order is then the order of the last layers
            last_at[size] = layer
    if not last_at:
        raise ModelError(f"{model.name}: no feature maps (N, H, W, C) to tap: is it a convolutional network?")
    final = list(last_at)[-1]
    stages = [layer for size, layer in last_at.items() if size[0] >= final[0] and size[1] >= final[1]]
    return sorted(stages, key=lambda layer: -_spatial(layer.output)[0] * _spatial(layer.output)[1])


def _nested(model: Any) -> list[Any]:
    """The functional models used as layers of ``model`` (a backbone inside a classifier)."""
    return [layer for layer in model.layers if _is_graph(layer)]


def _similar(asked: str, name: str) -> bool:
    return asked.lower() in name.lower() or name.lower().startswith(asked.lower()[:7])


def named_taps(model: Any, names: Sequence[str], key: str) -> list[Any]:
    """The layers ``names`` of ``model`` (shallow to deep as given), each with a 4-D output."""
    found = []
    known = {layer.name: layer for layer in model.layers}
    for name in names:
        layer = known.get(name)
        if layer is None:
            near = [n for n in known if _similar(name, n)][:5]
            raise ModelError(f"{key}: {model.name} has no layer {name!r}"
                             + (f" (similar: {', '.join(near)})" if near else ""))
        if _spatial(layer.output) is None:
            raise ModelError(f"{key}: layer {name!r} of {model.name} outputs {tuple(layer.output.shape)}, "
                             "not a feature map (N, H, W, C)")
        found.append(layer)
    return found


def _choose(model: Any, names: Sequence[str], key: str) -> tuple[Any, list[Any]]:
    """(the model holding the taps: ``model`` or a backbone nested in it, the tapped layers)."""
    if names:  # the model, or the nested backbone, holding most of them (errors name the rest)
        holder = max([model, *_nested(model)], key=lambda h: (
            sum(any(layer.name == n for layer in h.layers) for n in names),
            sum(any(_similar(n, layer.name) for layer in h.layers) for n in names)))
        return holder, named_taps(holder, names, key)
    head_input = _head_input(model)
    if head_input is not None and _is_graph(_producer(head_input)):
        return _choose(_producer(head_input), names, key)
    return model, default_taps(model)


def _through(model: Any, holder: Any, chosen: Sequence[Any]) -> tuple[Any, list[Any], list[Any]]:
    """``model`` rebuilt over its own layers with the nested ``holder`` also returning the taps:
    (the rebuilt model, its feature tensors, its pre-activation tensors)."""
    k = len(chosen)
    inner = keras.Model(holder.inputs, [holder.output, *[layer.output for layer in chosen],
                                        *[preactivation(layer) for layer in chosen]])
    captured: dict[str, list[Any]] = {}

    def call(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if layer is holder:
            outputs = inner(*args, **kwargs)
            captured["features"], captured["preact"] = list(outputs[1:1 + k]), list(outputs[1 + k:])
            return outputs[0]
        return layer(*args, **kwargs)

    rebuilt = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)
    if "features" not in captured:
        raise ModelError(f"{model.name}: could not reach the layers of {holder.name} inside it")
    return rebuilt, captured["features"], captured["preact"]


def preactivation(layer: Any) -> Any:
    """The tensor before a tap's final ReLU-like activation (the tap itself when it has none)."""
    if type(layer).__name__ in ("ReLU", "Activation") and getattr(layer, "input", None) is not None:
        return layer.input
    return layer.output


def _fix_sizes(config: Any, height: int, width: int) -> bool:
    """Sets every free image size of a serialized model (input layers, KerasHub backbones'
    ``image_shape``) to ``height x width`` in place; True when one was free."""
    changed = False
    if isinstance(config, dict):
        inner = config.get("config")
        if config.get("class_name") == "InputLayer" and isinstance(inner, dict):
            shape = inner.get("batch_shape") or inner.get("batch_input_shape")
            if isinstance(shape, (list, tuple)) and len(shape) == 4 and (shape[1] is None or shape[2] is None):
                inner["batch_shape" if "batch_shape" in inner else "batch_input_shape"] = [shape[0], height, width, shape[3]]
                changed = True
        shape = config.get("image_shape")
        if isinstance(shape, (list, tuple)) and len(shape) == 3 and (shape[0] is None or shape[1] is None):
            config["image_shape"] = [height, width, shape[2]]
            changed = True
        for value in config.values():
            changed = _fix_sizes(value, height, width) or changed
    elif isinstance(config, (list, tuple)):
        for value in config:
            changed = _fix_sizes(value, height, width) or changed
    return changed


def at_size(model: Any, height: int, width: int) -> Any:
    """``model`` with every free image size of its graph (its input, a nested network built for
    any size) set to ``height x width``, same weights: the taps are then read at the run's
    resolution. ``model`` itself when nothing in it is free."""
    config = keras.saving.serialize_keras_object(model)
    if not _fix_sizes(config, int(height), int(width)):
        return model
    try:
        rebuilt = keras.saving.deserialize_keras_object(config)
        rebuilt.set_weights(model.get_weights())
    except Exception as error:  # noqa: BLE001 - a layer that cannot be rebuilt at a fixed size
        raise ModelError(f"{model.name}: takes images of any size, and rebuilding it at {height}x{width} "
                         f"to find its feature maps failed ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200] if str(error) else ''}); save it with a "
                         "fixed input size") from None
    return rebuilt


def tap(model: Any, layers: Sequence[str] = (), output: str = "auto", path: str | None = None,
        name: str | None = None, key: str = "distill.teacher_layers") -> tuple[Any, str]:
    """``model`` as ``{"logits", "features", "preact"}`` over its own layers, and a one-line
    description of what was read (for the log). A backbone nested in the model (a
    ``keras.applications`` network called as a layer) is tapped inside."""
    path = path or model.name
    _layer_graph(model, path)
    holder, chosen = _choose(model, layers, key)
    if holder is model:
        graph, features, preact = model, [layer.output for layer in chosen], [preactivation(layer) for layer in chosen]
    else:
        graph, features, preact = _through(model, holder, chosen)
    logits, how = logits_tensor(graph, output)
    tapped = keras.Model(graph.inputs[0], {"logits": logits, "features": features, "preact": preact},
                         name=name or model.name)
    sizes = ", ".join(f"{layer.name} {_spatial(layer.output)[0]}x{_spatial(layer.output)[1]}x"
                      f"{int(layer.output.shape[-1])}" for layer in chosen)
    where = "" if holder is model else f" inside {holder.name}"
    chosen_by = "named" if layers else "the last layer at each resolution"
    return tapped, f"logits: {how}; taps{where} ({chosen_by}): {sizes}"


def is_tfkd_model(model: Any) -> bool:
    """True for a model that returns the tfkd contract already (the zoo, tfkd students)."""
    output = getattr(model, "output", None)
    return isinstance(output, dict) and "logits" in output and "features" in output
