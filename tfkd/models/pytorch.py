"""PyTorch CIFAR ResNets (He et al. 2016, option A) into the zoo's ``resnet{depth}a``.

``read_state_dict`` reads a PyTorch-layout state dict from a ``.npz`` (plain arrays, nothing
pickled) or from an original ``.th``/``.pt`` checkpoint of PyTorch's legacy (pre-zip) format.
The checkpoint is a pickle; it is read with an unpickler that knows only the few names a state
dict uses (an ordered dict, tensors, float storages) and refuses every other object, so no code
in the file can run. ``import_cifar_resnet`` builds the matching zoo model, copies the weights
(convolution kernels transposed from (out, in, kh, kw) to (kh, kw, in, out), the classifier from
(classes, features) to (features, classes); batch norm epsilon 1e-5 as PyTorch's) and puts the
normalization the weights were trained with in front, so the model takes [0, 255] pixels.
"""

from __future__ import annotations

import io
import pickle
import re
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tfkd.errors import ModelError

#: The normalization of torchvision's ImageNet statistics, which the public CIFAR ResNets of
#: akamaster/pytorch_resnet_cifar10 were trained with (pixels scaled to [0, 1] first).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                   "LongStorage": np.int64, "IntStorage": np.int32, "ByteStorage": np.uint8}


class _Tensor:
    """A tensor as the checkpoint describes it: a view into a storage."""

    def __init__(self, storage: "_Storage", offset: int, size: Sequence[int], stride: Sequence[int]) -> None:
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def array(self) -> np.ndarray:
        """The tensor's values, copied out of its storage."""
        data = self.storage.data
        if data is None:
            raise ModelError("checkpoint: a tensor's storage was never written")
        item = data.itemsize
        return np.lib.stride_tricks.as_strided(data[self.offset:], self.size,
                                               [s * item for s in self.stride]).copy()


class _Storage:
    def __init__(self, dtype: Any, key: str, size: int) -> None:
        self.dtype, self.key, self.size, self.data = dtype, key, int(size), None


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only what a PyTorch state dict holds; any other global is refused."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        """pickle's hook for a global: the few a state dict uses, else ``ModelError``."""
        if (module, name) in (("collections", "OrderedDict"),):
            import collections

            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: _Tensor(storage, offset, size, stride)
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise ModelError(f"checkpoint: refusing to load {module}.{name} (only plain state dicts "
                         "are read)")

    def persistent_load(self, pid: Any) -> Any:
        """pickle's hook for a tensor storage: a placeholder filled from the file's tail."""
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) >= 5):
            raise ModelError("checkpoint: unexpected persistent object (not a tensor storage)")
        _, kind, key, _location, size = pid[:5]
        if kind not in _STORAGE_DTYPES:
            raise ModelError(f"checkpoint: unsupported storage {kind!r}")
        if key not in self.storages:
            self.storages[key] = _Storage(_STORAGE_DTYPES[kind], str(key), size)
        return self.storages[key]


def _read_legacy_checkpoint(raw: bytes, path: Path) -> dict[str, Any]:
    stream = io.BytesIO(raw)
    restricted = lambda: _StateDictUnpickler(stream)  # noqa: E731
    try:
        magic = restricted().load()
        if magic != _LEGACY_MAGIC:
            raise ModelError(f"{path}: not a PyTorch checkpoint of the legacy format (a zip "
                             "checkpoint? export its state_dict to .npz with numpy)")
        restricted().load()  # protocol version
        restricted().load()  # system info
        main = restricted()
        obj = main.load()
        keys = restricted().load()
        for key in keys:
            storage = main.storages[str(key)]
            (count,) = struct.unpack("<q", stream.read(8))
            item = np.dtype(storage.dtype).itemsize
            buffer = stream.read(count * item)
            if len(buffer) != count * item:
                raise ModelError(f"{path}: truncated (storage {key} is cut short)")
            storage.data = np.frombuffer(buffer, dtype=storage.dtype)
    except (pickle.UnpicklingError, EOFError, struct.error, KeyError, ValueError) as error:
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ModelError(f"{path}: holds no state dict")
    return {k: v.array() for k, v in state.items() if isinstance(v, _Tensor)}


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A PyTorch-layout state dict as NumPy arrays, names without ``module.`` prefixes.

    Raises ``ModelError`` naming the file when it is missing, unreadable, or holds objects
    other than tensors (no code in the file can run).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                state = {name: archive[name] for name in archive.files}
        except (OSError, ValueError) as error:
            raise ModelError(f"{path}: not a readable .npz of arrays ({error})") from None
    else:
        state = _read_legacy_checkpoint(path.read_bytes(), path)
    return {re.sub(r"^module\.", "", name): value for name, value in state.items()}


def _blocks(state: dict[str, np.ndarray], stage: int) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.conv1\.weight$", k))}
    if not found or sorted(found) != list(range(len(found))):
        raise ModelError(f"state dict: no blocks layer{stage}.0, layer{stage}.1, ... (not a CIFAR ResNet)")
    return len(found)


def import_cifar_resnet(state: dict[str, np.ndarray], mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD, input_size: int = 32) -> Any:
    """The zoo's ``resnet{6n+2}a`` holding ``state``'s weights, with the training normalization
    (``mean``/``std`` of [0, 1] pixels) in front: it takes [0, 255] pixels and returns
    ``{"logits", "features"}``. Raises ``ModelError`` when a tensor is missing or mis-shaped."""
    from tfkd.models.resnet import cifar_resnet_a

    blocks = [_blocks(state, s) for s in (1, 2, 3)]
    if len(set(blocks)) != 1:
        raise ModelError(f"state dict: stages of {blocks} blocks; a CIFAR ResNet has equal stages")
    if "linear.weight" not in state:
        raise ModelError("state dict: no classifier 'linear.weight'")
    depth, classes = 6 * blocks[0] + 2, int(state["linear.weight"].shape[0])
    net = cifar_resnet_a(depth, classes, (input_size, input_size, 3),
                         pixel_normalization=([255.0 * m for m in mean], [255.0 * s for s in std]))
    used: set[str] = set()

    def take(name: str, shape: Sequence[int]) -> np.ndarray:
        if name not in state:
            raise ModelError(f"state dict: missing {name!r} for resnet{depth}a")
        value = np.asarray(state[name], dtype=np.float32)
        if tuple(value.shape) != tuple(shape):
            raise ModelError(f"state dict: {name!r} is {tuple(value.shape)}, resnet{depth}a needs {tuple(shape)}")
        used.add(name)
        return value

    def copy_conv(layer: str, prefix: str) -> None:
        kernel = net.get_layer(layer).kernel
        kh, kw, cin, cout = kernel.shape
        kernel.assign(take(f"{prefix}.weight", (cout, cin, kh, kw)).transpose(2, 3, 1, 0))

    def copy_bn(layer: str, prefix: str) -> None:
        bn = net.get_layer(layer)
        channels = bn.gamma.shape[0]
        for var, key in ((bn.gamma, "weight"), (bn.beta, "bias"), (bn.moving_mean, "running_mean"),
                         (bn.moving_variance, "running_var")):
            var.assign(take(f"{prefix}.{key}", (channels,)))
        used.add(f"{prefix}.num_batches_tracked")

    copy_conv("stem_conv", "conv1")
    copy_bn("stem_bn", "bn1")
    for stage in (1, 2, 3):
        for block in range(blocks[0]):
            name, prefix = f"stage{stage}_block{block + 1}", f"layer{stage}.{block}"
            for i in (1, 2):
                copy_conv(f"{name}_conv{i}", f"{prefix}.conv{i}")
                copy_bn(f"{name}_bn{i}", f"{prefix}.bn{i}")
    head = net.get_layer("logits")
    head.kernel.assign(take("linear.weight", (classes, head.kernel.shape[0])).T)
    head.bias.assign(take("linear.bias", (classes,)))
    unused = sorted(set(state) - used)
    if unused:
        raise ModelError(f"state dict: tensors resnet{depth}a has no place for: {', '.join(unused[:4])}")
    return net
