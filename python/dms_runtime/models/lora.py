"""Low-rank updates of the base projections that apply only while DMS is active.

A retrofit that trains only the eviction adapter leaves the base to cope with the keys it loses;
the paper retrofits the whole model instead. :class:`LoRALinear` is the shippable middle: a
projection ``W x + b + (alpha / r) * B (A x)`` whose update ``B A`` is trained with the adapter
and saved with it (``dms_weights.safetensors``), while the base weights keep their names and
stay frozen. The update is gated on ``ModelConfig.dms_active``: with eviction off
(``dms_disable_eviction``, the distillation teacher, the eval's vanilla reference) the model is
exactly the base. ``B`` starts at zero, so a fresh update changes nothing.

For inference the update can be merged into the base weight (:func:`merge_lora`, done by
``dms_runtime.load`` unless ``merge_lora=False``): a projection is then one matmul, as in a model
without LoRA. A merged projection computes the base (eviction off) as ``W' x - (alpha / r) B A x``,
equal to the base up to the rounding of ``W' = W + (alpha / r) B A`` in the weight's dtype; training
and the teacher-forced eval keep the update apart (exact).
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
        self.merged = False  # True: ``weight`` holds W + scaling * B A (merge_lora)
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

    def delta(self) -> torch.Tensor:
        """The update ``scaling * B A`` as a float32 matrix of the weight's shape."""
        return (self.dms_lora_b.detach().float() @ self.dms_lora_a.detach().float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight`` (rounded once to its dtype); the update's factors stay, so
        the base path (eviction off) and :meth:`unmerge` still have them."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of ``weight`` (the base up to the merge's rounding)."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
            self.merged = False

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.dms_lora_a), self.dms_lora_b) * self.scaling

    def project(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The projection with ``bias`` (None: a row-parallel rank's partial sum, biased after it)."""
        y = F.linear(x, self.weight, bias)
        if self.merged:  # weight = W + update: the base needs it taken out
            return y if self.cfg.dms_active else y - self._update(x)
        return y + self._update(x) if self.cfg.dms_active else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, self.bias)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, lora_rank={self.dms_lora_a.shape[0]}, scaling={self.scaling:g}"
                f"{', merged' if self.merged else ''}")


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


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA update of ``model`` into its base weight (inference: one matmul per
    projection while eviction is on); returns how many projections it merged."""
    mods = [m for m in lora_modules(model) if not m.merged]
    for m in mods:
        m.merge()
    return len(mods)


def unmerge_lora(model: nn.Module) -> int:
    """Undo :func:`merge_lora`; returns how many projections it unmerged."""
    mods = [m for m in lora_modules(model) if m.merged]
    for m in mods:
        m.unmerge()
    return len(mods)


def has_merged_lora(model: nn.Module) -> bool:
    return any(m.merged for m in lora_modules(model))


def refuse_merged(model: nn.Module, what: str, to: str) -> None:
    """A ValueError naming ``what`` if ``model``'s updates are merged: new factors (or training)
    under a weight that holds the old update would corrupt the model."""
    if has_merged_lora(model):
        raise ValueError(f"{what}: the model's LoRA updates are merged into its base weights (inference); load it "
                         f"with dms_runtime.load(..., merge_lora=False) to {to}")
