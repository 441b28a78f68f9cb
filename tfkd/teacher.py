"""The reconstruction-augmented teacher (METHOD.md, phase 1).

One shared encoder (a zoo backbone up to its last stage), the backbone's own classifier head,
and a decoder that reconstructs the normalized input from the last stage's feature map:
``L_T = lambda_cls * CE(y, logits) + lambda_rec * MSE(x, x_hat)``. With ``lambda_rec = 0`` it is
a plain classifier, with ``lambda_cls = 0`` an autoencoder: MKTN's two teachers are this class.
The decoder serves training only; distillation and export use ``backbone``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import keras
import tensorflow as tf

from tfkd import losses, precision
from tfkd.models.common import batch_norm, conv


#: The widest map the decoder convolves: a wider feature map (a MobileNet's 1280 channels) is
#: first projected to it by a 1x1 convolution, so decoding costs about what the network does.
DECODER_MAX_CHANNELS = 256


def build_decoder(feature_shape: Sequence[int], image_shape: Sequence[int],
                  min_channels: int = 16, sync_bn: bool = False,
                  name: str = "decoder", max_channels: int = DECODER_MAX_CHANNELS) -> keras.Model:
    """Decoder from a (H, W, C) feature map back to an image of ``image_shape``.

    A map wider than ``max_channels`` is first projected to it (1x1 conv, batch norm, ReLU).
    Then one step per factor of 2 between feature and image size (x2 nearest upsample, 3x3 conv
    halving the channels down to ``min_channels``, batch norm, ReLU), then a linear 3x3 conv to
    the image's channels: it predicts the normalized image, which is unbounded. When the ratio
    is not a power of 2 (a 100-px input over a 4-px map) the doublings overshoot and a bilinear
    resize lands on the image size.
    ``sync_bn`` synchronizes batch statistics across replicas, like the backbone's option.
    """
    height, width, channels = feature_shape
    ratio = max(image_shape[0] / height, image_shape[1] / width)
    if ratio < 1:
        raise ValueError(f"cannot decode a {height}-px feature map to a smaller {image_shape[0]}-px image")
    steps = math.ceil(math.log2(ratio) - 1e-9)
    inputs = keras.Input(shape=tuple(feature_shape), name="features")
    x = inputs
    if channels > max_channels:
        channels = max_channels
        x = conv(keras, channels, 1, name="project_conv")(x)
        x = batch_norm(keras, sync_bn, name="project_bn")(x)
        x = keras.layers.ReLU(name="project_relu")(x)
    for step in range(steps):
        channels = max(min_channels, channels // 2)
        x = keras.layers.UpSampling2D(2, name=f"up{step + 1}")(x)
        x = conv(keras, channels, 3, name=f"up{step + 1}_conv")(x)
        x = batch_norm(keras, sync_bn, name=f"up{step + 1}_bn")(x)
        x = keras.layers.ReLU(name=f"up{step + 1}_relu")(x)
    if (height * 2**steps, width * 2**steps) != tuple(image_shape[:2]):
        x = keras.layers.Resizing(int(image_shape[0]), int(image_shape[1]), interpolation="bilinear",
                                  name="to_image_size")(x)
    outputs = keras.layers.Conv2D(image_shape[-1], 3, padding="same", name="reconstruction")(x)
    return keras.Model(inputs, outputs, name=name)


@keras.saving.register_keras_serializable(package="tfkd")
class ReconstructionTeacher(keras.Model):
    """A classifier trained jointly with image reconstruction.

    Args:
        backbone: a zoo model returning ``{"logits", "features"}``.
        decoder: maps the last feature map to the image; built to fit when omitted.
        lambda_cls: weight of the cross-entropy term.
        lambda_rec: weight of the reconstruction MSE (on normalized pixels).
        pixel_mean, pixel_std: the input normalization, per channel, on the [0, 255] scale;
            used to report reconstruction PSNR in pixel units.
        head_layers: layers of the backbone that are new on a pretrained network (its fresh
            classification head): with a ``backbone_optimizer`` they train with the decoder.

    ``call`` returns ``{"logits", "features", "reconstruction"}``. When ``lambda_rec`` is 0 the
    decoder is skipped in training (``reconstruction`` is None there): a plain classifier does
    not pay for a decoder it does not train.
    """

    def __init__(self, backbone: keras.Model, decoder: keras.Model | None = None,
                 lambda_cls: float = 1.0, lambda_rec: float = 1.0,
                 pixel_mean: Sequence[float] = (0.0, 0.0, 0.0),
                 pixel_std: Sequence[float] = (1.0, 1.0, 1.0), head_layers: Sequence[str] = (),
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.head_layers = [str(n) for n in head_layers]
        self.backbone = backbone
        image_shape = tuple(backbone.input_shape[1:])
        feature_shape = tuple(backbone.output["features"][-1].shape[1:])
        sync_bn = any(getattr(layer, "synchronized", False) for layer in backbone.layers)
        self.decoder = decoder or build_decoder(feature_shape, image_shape, sync_bn=sync_bn)
        self.lambda_cls = float(lambda_cls)
        self.lambda_rec = float(lambda_rec)
        self.pixel_mean = [float(v) for v in pixel_mean]
        self.pixel_std = [float(v) for v in pixel_std]
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.ce_tracker = keras.metrics.Mean(name="ce")
        self.rec_tracker = keras.metrics.Mean(name="rec")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.psnr = keras.metrics.Mean(name="psnr")

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        return [self.loss_tracker, self.ce_tracker, self.rec_tracker, self.accuracy, self.psnr]

    def call(self, images: tf.Tensor, training: bool = False) -> dict[str, Any]:
        out = self.backbone(images, training=training)
        reconstruction = None
        if not (training and self.lambda_rec == 0):
            reconstruction = self.decoder(out["features"][-1], training=training)
        # the losses and metrics read float32 whatever the layers computed in
        return precision.float32({"logits": out["logits"], "features": out["features"],
                                  "reconstruction": reconstruction})

    def compute_losses(self, images: tf.Tensor, labels: tf.Tensor,
                       outputs: dict[str, Any]) -> dict[str, tf.Tensor]:
        """The unscaled loss terms and their weighted total, as means over the batch."""
        ce = losses.cross_entropy(labels, outputs["logits"])
        rec = (losses.mean_squared_error(images, outputs["reconstruction"])
               if outputs["reconstruction"] is not None else tf.constant(0.0))
        return {"loss": self.lambda_cls * ce + self.lambda_rec * rec, "ce": ce, "rec": rec}

    def _update_metrics(self, images: tf.Tensor, labels: tf.Tensor, outputs: dict[str, Any],
                        terms: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        self.loss_tracker.update_state(terms["loss"])
        self.ce_tracker.update_state(terms["ce"])
        self.rec_tracker.update_state(terms["rec"])
        self.accuracy.update_state(labels, outputs["logits"])
        if outputs["reconstruction"] is None:
            return {m.name: m.result() for m in self.metrics if m is not self.psnr}
        mean = tf.constant(self.pixel_mean, tf.float32)
        std = tf.constant(self.pixel_std, tf.float32)
        self.psnr.update_state(losses.psnr(images * std + mean,
                                           outputs["reconstruction"] * std + mean))
        return {m.name: m.result() for m in self.metrics}

    def compile(self, optimizer: Any = "sgd", backbone_optimizer: Any = None, **kwargs: Any) -> None:
        """``optimizer`` trains everything, or with ``backbone_optimizer`` (a fine-tuned
        pretrained backbone at its own rate) everything but the backbone."""
        super().compile(optimizer=optimizer, **kwargs)
        self.backbone_optimizer = keras.optimizers.get(backbone_optimizer) if backbone_optimizer else None
        if self.backbone_optimizer is not None and isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            self.backbone_optimizer = keras.optimizers.LossScaleOptimizer(self.backbone_optimizer)

    def _variable_groups(self) -> list[tuple[Any, list[tf.Variable]]]:
        if getattr(self, "backbone_optimizer", None) is None:
            return [(self.optimizer, list(self.trainable_variables))]
        head = {id(v) for name in self.head_layers for v in self.backbone.get_layer(name).trainable_variables}
        pretrained = [v for v in self.backbone.trainable_variables if id(v) not in head]
        mine = {id(v) for v in pretrained}
        return [(self.optimizer, [v for v in self.trainable_variables if id(v) not in mine]),
                (self.backbone_optimizer, pretrained)]

    def get_compile_config(self) -> None:
        """No compile state is saved: a loaded teacher is used frozen, or compiled again."""
        return None

    def build_optimizers(self) -> None:
        """Creates the optimizers' slots (inside the strategy scope, before ``fit``: a backup
        can only be restored into built optimizers)."""
        for optimizer, variables in self._variable_groups():
            optimizer.build(variables)

    def train_step(self, data: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            outputs = self(images, training=True)
            terms = self.compute_losses(images, labels, outputs)
            scaled = losses.scale_for_replicas(terms["loss"])
        precision.apply_gradients(tape, scaled, self._variable_groups())
        return self._update_metrics(images, labels, outputs, terms)

    def test_step(self, data: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        outputs = self(images, training=False)
        return self._update_metrics(images, labels, outputs,
                                    self.compute_losses(images, labels, outputs))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "decoder": keras.saving.serialize_keras_object(self.decoder),
            "lambda_cls": self.lambda_cls, "lambda_rec": self.lambda_rec,
            "pixel_mean": self.pixel_mean, "pixel_std": self.pixel_std,
            "head_layers": self.head_layers,
        })
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ReconstructionTeacher":
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        config["decoder"] = keras.saving.deserialize_keras_object(config["decoder"])
        return cls(**config)
