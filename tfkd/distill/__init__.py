"""Knowledge transfer: the Distiller (one ``train_step`` for every method), the ConvBlock
adapter, the feature-map discriminator and the method table."""

from tfkd.distill.adapters import ConvBlock
from tfkd.distill.discriminator import build_discriminator
from tfkd.distill.distiller import Distiller, resolve_stages
from tfkd.distill.methods import METHODS, LossWeights, loss_weights, teachers_needed

__all__ = ["ConvBlock", "Distiller", "LossWeights", "METHODS", "build_discriminator",
           "loss_weights", "resolve_stages", "teachers_needed"]
