"""The single dispatch point for paged attention implementations.

An implementation has the signature of :func:`attention_torch.torch_paged_attention`. The torch
one runs everywhere; kernel backends (Triton, CUDA) register themselves here and are chosen by
device and availability, or forced by name.
"""

from __future__ import annotations

from typing import Callable

import torch

from .attention_torch import torch_paged_attention

_REGISTRY: dict[str, tuple[Callable, Callable[[torch.device], bool], int]] = {}


def register(name: str, fn: Callable, available: Callable[[torch.device], bool], priority: int) -> None:
    """Register an implementation; ``auto`` picks the available one with the highest priority."""
    _REGISTRY[name] = (fn, available, priority)


register("torch", torch_paged_attention, lambda device: True, priority=0)


def names() -> list[str]:
    return sorted(_REGISTRY)


def select(name: str, device: torch.device) -> tuple[str, Callable]:
    if name == "auto":
        ok = [(prio, n) for n, (fn, avail, prio) in _REGISTRY.items() if avail(device)]
        best = max(ok)[1]
        return best, _REGISTRY[best][0]
    if name not in _REGISTRY:
        raise ValueError(f"attention: unknown backend {name!r}; available: auto, {', '.join(names())}")
    fn, avail, _ = _REGISTRY[name]
    if not avail(device):
        raise ValueError(f"attention: backend {name!r} cannot run on {device}")
    return name, fn
