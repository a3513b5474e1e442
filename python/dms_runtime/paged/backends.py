"""The single dispatch point for paged attention implementations.

An implementation has the signature of :func:`attention_torch.torch_paged_attention`. ``auto``
picks, among the implementations that run natively on the device, the one with the highest
priority (CUDA > Triton > CPU kernels > torch); any can be forced by name where it can run at all
(Triton on CPU runs under ``TRITON_INTERPRET=1``, for tests). The CPU kernels ("cpu") need the
built ``dms_kernels._cpu``; without it ``auto`` falls back to torch and forcing "cpu" says why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from .attention_torch import torch_paged_attention


@dataclass(frozen=True, slots=True)
class Impl:
    fn: Callable
    native: Callable[[torch.device], bool]  # fast here: eligible for "auto"
    runnable: Callable[[torch.device], bool]  # can run here at all: eligible when forced
    priority: int
    store: Callable | None = None  # data movement of the cache's store step (None: torch indexing)
    project: Callable | None = None  # fused q/k norm + logits + RoPE + previous decision (None: torch ops)


_REGISTRY: dict[str, Impl] = {}


def register(name: str, fn: Callable, native, runnable=None, priority: int = 0, store: Callable | None = None,
             project: Callable | None = None) -> None:
    _REGISTRY[name] = Impl(fn, native, runnable or native, priority, store, project)


def _op_fn(impl: str):
    def fn(*args, **kwargs):
        from dms_kernels.ops import paged_attention_op  # torch.ops.dms.paged_attention

        return paged_attention_op(*args, **kwargs, impl=impl)

    return fn


def _op_store(impl: str):
    def store(*args):
        from dms_kernels.ops import paged_store_op  # torch.ops.dms.paged_store

        return paged_store_op(*args, impl=impl)

    return store


def _triton_project(*args):
    import dms_kernels.ops  # noqa: F401  (registers torch.ops.dms.*)

    return torch.ops.dms.fused_project(*args)


def _cuda_ready(dev: torch.device) -> bool:
    """A Hopper GPU, the built ``dms_kernels._cuda`` reporting a device, and Triton (prefill
    chunks, unsupported shapes and the projection epilogue run on the Triton kernels)."""
    if dev.type != "cuda" or not torch.cuda.is_available() or not _has_triton():
        return False
    from dms_kernels import cuda

    return cuda.unavailable_reason(dev) is None


def _cuda_reason(dev: torch.device) -> str:
    if not _has_triton():
        return "needs Triton for prefill chunks and the projection"
    from dms_kernels import cuda

    return cuda.unavailable_reason(dev) or "needs a Hopper GPU"


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _cpu_reason(dev: torch.device) -> str | None:
    from dms_kernels import cpu

    return cpu.unavailable_reason(dev)


register("torch", torch_paged_attention, lambda dev: True, priority=0)
# the fused C++ kernels (dms_kernels._cpu) behind the same ops, impl="cpu"; the projection stays torch
register("cpu", _op_fn("cpu"), native=lambda dev: _cpu_reason(dev) is None, priority=5, store=_op_store("cpu"))
# "triton" and "cuda" are the same ops (torch.ops.dms.paged_attention / paged_store) with their
# kernel set forced by the ops' ``impl`` argument.
register("triton", _op_fn("triton"),
         native=lambda dev: dev.type == "cuda" and _has_triton(),
         runnable=lambda dev: _has_triton() and (dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"),
         priority=10, store=_op_store("triton"), project=_triton_project)
register("cuda", _op_fn("cuda"), native=_cuda_ready, runnable=_cuda_ready, priority=20, store=_op_store("cuda"),
         project=_triton_project)


def names() -> list[str]:
    return sorted(_REGISTRY)


def select(name: str, device: torch.device) -> tuple[str, Callable]:
    """(name, attention function); :func:`store_for` gives the same backend's store mover."""
    device = torch.device(device)
    if name == "auto":
        best = max((impl.priority, n) for n, impl in _REGISTRY.items() if impl.native(device))[1]
        return best, _REGISTRY[best].fn
    if name not in _REGISTRY:
        raise ValueError(f"attention: unknown backend {name!r}; available: auto, {', '.join(names())}")
    impl = _REGISTRY[name]
    if not impl.runnable(device):
        hint = {"triton": " (on CPU set TRITON_INTERPRET=1)", "cuda": f" ({_cuda_reason(device)})",
                "cpu": f" ({_cpu_reason(device)})"}.get(name, "")
        raise ValueError(f"attention: backend {name!r} cannot run on {device}{hint}")
    return name, impl.fn


def store_for(name: str) -> Callable | None:
    return _REGISTRY[name].store


def project_for(name: str) -> Callable | None:
    return _REGISTRY[name].project
