"""Low-rank updates of the base projections that apply only while DMS is active.

A retrofit that trains only the eviction adapter leaves the base to cope with the keys it loses;
the paper retrofits the whole model instead. :class:`LoRALinear` is the shippable middle: a
projection ``W x + b + (alpha / r) * B (A x)`` whose update ``B A`` is trained with the adapter
and saved with it (``dms_weights.safetensors``), while the base weights keep their names and
stay frozen. The update is gated on ``ModelConfig.dms_active``: with eviction off
(``dms_disable_eviction``, the distillation teacher, the eval's vanilla reference) the model is
exactly the base. ``B`` starts at zero, so a fresh update changes nothing.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from ..config import LORA_TARGETS, ModelConfig


class LoRALinear(nn.Linear):
    """``nn.Linear`` (same ``weight`` / ``bias`` names, so checkpoints load unchanged) plus the
    gated low-rank update ``dms_lora_b @ dms_lora_a``, scaled by ``alpha / rank``."""

    def __init__(self, cfg: ModelConfig, in_features: int, out_features: int, bias: bool, seed: int):
        super().__init__(in_features, out_features, bias=bias)
        dms = cfg.dms
        self.cfg = cfg
        self.scaling = dms.lora_alpha / dms.lora_rank
        self.lora_seed = seed
        self.dms_lora_a = nn.Parameter(torch.empty(dms.lora_rank, in_features))
        self.dms_lora_b = nn.Parameter(torch.empty(out_features, dms.lora_rank))
        if not self.dms_lora_a.is_meta:
            self.reset_lora()

    @torch.no_grad()
    def reset_lora(self) -> None:
        """The fresh update: ``A`` kaiming-uniform from this projection's own seed (reproducible
        without the global RNG), ``B`` zero, so ``B A = 0``."""
        a = self.dms_lora_a
        g = torch.Generator(device="cpu").manual_seed(self.lora_seed)
        bound = 1.0 / math.sqrt(a.shape[1])
        a.copy_(((torch.rand(a.shape, generator=g) * 2 - 1) * bound).to(a.dtype))
        self.dms_lora_b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.cfg.dms_active:
            y = y + F.linear(F.linear(x, self.dms_lora_a), self.dms_lora_b) * self.scaling
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.dms_lora_a.shape[0]}, scaling={self.scaling:g}"


def projection(cfg: ModelConfig, layer: int, name: str, in_features: int, out_features: int,
               bias: bool) -> nn.Linear:
    """Layer ``layer``'s projection ``name`` (one of :data:`LORA_TARGETS`): a :class:`LoRALinear` when
    the model's DMS settings give it a low-rank update (``dms_lora_rank > 0``, ``name`` in
    ``dms_lora_targets``), seeded by its place in the model."""
    assert name in LORA_TARGETS, name
    dms = cfg.dms
    if dms is not None and dms.lora_rank and name in dms.lora_targets:
        return LoRALinear(cfg, in_features, out_features, bias, seed=layer * len(LORA_TARGETS) + LORA_TARGETS.index(name))
    return nn.Linear(in_features, out_features, bias=bias)


def is_lora_parameter(name: str) -> bool:
    return name.endswith((".dms_lora_a", ".dms_lora_b"))
