"""Retrofitting a model with DMS: the training-time attention, the losses, the training loop."""

from .training_backend import TrainingAttention, eviction_off
from .losses import compression_target, distillation_kl
from .trainer import RetrofitConfig, Retrofitter

__all__ = ["TrainingAttention", "eviction_off", "distillation_kl", "compression_target", "RetrofitConfig",
           "Retrofitter"]
