"""The kernel sets of the paged runtime, and the one place that chooses one.

A kernel set (:class:`PagedKernels`) is one object with the three ops a layer runs on the paged
cache: ``project`` (q/k norm, eviction logits, zeroing, RoPE, the previous key's decision),
``attend`` (DMS attention over the held tokens plus the new chunk) and ``store`` (the data
movement of the cache's store step). :func:`resolve` turns ``PagedConfig.attention`` into one,
once, at engine construction: ``"auto"`` picks, among the sets that run natively on the device,
the one with the highest priority (CUDA > Triton > CPU kernels > torch); a name forces one where
it can run at all (Triton on CPU runs under ``TRITON_INTERPRET=1``, for tests). The CPU kernels
("cpu") need the built ``dms_kernels._cpu``; without it ``auto`` falls back to torch and forcing
"cpu" says why.

Each set says which implementation runs each op of a step (:meth:`PagedKernels.ran`), decided
by the same functions the ops route by, so the engine's stats name what ran: e.g. the ``cuda``
set runs decode on the hand-written kernels and prefill chunks on Triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .torch_kernels import torch_paged_attention

OPS = ("projection", "prefill", "decode", "store")


class PagedKernels(Protocol):
    """The ops of one kernel set. ``plan`` is the step's :class:`~.plan.StepPlan`; ``layer`` the
    layer index; ``lists``/``kept0``/``table``/``ring_evict`` that layer's rows ``[B, H, ...]``."""

    name: str

    def projection(self, cfg) -> str:
        """What runs the projection epilogue for a model of ``cfg``: "torch" records no decision."""

    def ran(self, cfg, plan, dtype: torch.dtype) -> dict[str, str]:
        """op -> implementation for a step of ``plan`` (ops: projection, prefill or decode, store)."""

    def project(self, cache, plan, lists, attn, q_lin, k_lin, h_pre, cos, sin, sinks):
        """-> q ``[B, Hq, T, D]``, k ``[B, H, T, D]``, logits ``[B, H, T]`` float32 or None, the
        attention sinks kept (``sinks``: the step's ``[B, 1, T]`` mask, or None)."""

    def attend(self, cache, plan, layer, q, k, v, new_evict, ring_evict) -> torch.Tensor:
        """-> ``[B, Hq, T, D]``."""

    def store(self, cache, plan, layer, lists, k, v, new_evict, keep) -> None:
        """Move leaving kept tokens to the kept store and new tokens into the ring (pages reserved)."""


class TorchKernels:
    """Plain torch: runs anywhere (the gather over page lists, SDPA, indexing)."""

    name = "torch"

    def projection(self, cfg) -> str:
        return "torch"

    def ran(self, cfg, plan, dtype) -> dict[str, str]:
        return {"projection": "torch", "decode" if plan.decode else "prefill": "torch", "store": "torch"}

    def project(self, cache, plan, lists, attn, q_lin, k_lin, h_pre, cos, sin, sinks):
        return attn._project(q_lin, k_lin, h_pre, cos, sin, sinks)

    def attend(self, cache, plan, layer, q, k, v, new_evict, ring_evict):
        return torch_paged_attention(q, k, v, new_evict, plan.n_new, plan.starts, cache.k_pool, cache.v_pool,
                                     plan.tables[layer], plan.kept0[layer], ring_evict, cache.w, cache.R,
                                     kept_max=plan.kept_max)

    def store(self, cache, plan, layer, lists, k, v, new_evict, keep):
        cache.move_torch(plan, lists, plan.kept0[layer], keep, k, v, new_evict)


class OpKernels:
    """``torch.ops.dms.fused_project`` / ``paged_attention`` / ``paged_store`` with the ops' ``impl``
    set: "triton", "cuda" (the hand-written kernels behind the same ops, Triton where they do not
    cover a call) or "cpu" (the C++ kernels; the projection stays in torch)."""

    def __init__(self, impl: str):
        import dms_kernels.ops  # noqa: F401  (registers torch.ops.dms.*)

        self.name = self.impl = impl

    def projection(self, cfg) -> str:
        # per-layer decisions (one logit for all heads) stay in torch, as does the CPU set's projection
        return "torch" if self.impl == "cpu" or (cfg.dms_active and cfg.dms.alpha_per == "layer") else "triton"

    def ran(self, cfg, plan, dtype) -> dict[str, str]:
        from dms_kernels.ops import attention_kernels, store_kernels

        dev = plan.starts.device
        g = cfg.num_heads // cfg.num_kv_heads
        return {"projection": self.projection(cfg),
                "decode" if plan.decode else "prefill": attention_kernels(self.impl, dev, plan.t, dtype, cfg.head_dim, g),
                "store": store_kernels(self.impl, dev, dtype, dtype, cfg.head_dim)}

    def project(self, cache, plan, lists, attn, q_lin, k_lin, h_pre, cos, sin, sinks):
        cfg = attn.cfg
        if self.projection(cfg) == "torch":
            return attn._project(q_lin, k_lin, h_pre, cos, sin, sinks)
        dms = cfg.dms
        variant, adapter = "none", None
        if cfg.dms_active:
            variant = "adapter" if dms.separate_alpha else "borrowed"
            if dms.separate_alpha:
                adapter = attn.adapter_logits(h_pre)
        # the kernel keeps the sinks itself, from the positions (starts + t), not from the mask
        q, k, logits = torch.ops.dms.fused_project(
            q_lin, k_lin, cos, sin, attn.q_norm.weight if cfg.qk_norm else None,
            attn.k_norm.weight if cfg.qk_norm else None, adapter, cache.ring_mark, lists, plan.starts, plan.n_new,
            cfg.num_kv_heads, variant, cfg.rms_norm_eps, dms.alpha_scale if dms else 1.0,
            dms.initial_alpha_offset if dms else 0.0, dms.sink_tokens if cfg.dms_active else 0)
        return q, k, (logits if cfg.dms_active else None)

    def attend(self, cache, plan, layer, q, k, v, new_evict, ring_evict):
        from dms_kernels import ops

        return ops.paged_attention_op(q, k, v, new_evict, plan.n_new, plan.starts, cache.k_pool, cache.v_pool,
                                      plan.tables[layer], plan.kept0[layer], ring_evict, cache.w, cache.R,
                                      max_tokens=plan.max_tokens, impl=self.impl)

    def store(self, cache, plan, layer, lists, k, v, new_evict, keep):
        from dms_kernels import ops

        ops.paged_store_op(k, v, new_evict, cache.k_pool, cache.v_pool, cache.page_table, cache.ring_evict, lists,
                           plan.kept0[layer], plan.starts, plan.n_new, cache.w, cache.R, impl=self.impl)


@dataclass(frozen=True, slots=True)
class Entry:
    make: Callable[[], PagedKernels]
    native: Callable[[torch.device], bool]  # fast here: eligible for "auto"
    runnable: Callable[[torch.device], bool]  # can run here at all: eligible when forced
    priority: int


_REGISTRY: dict[str, Entry] = {}


def register(name: str, make: Callable[[], PagedKernels], native, runnable=None, priority: int = 0) -> None:
    _REGISTRY[name] = Entry(make, native, runnable or native, priority)


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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


def _cpu_reason(dev: torch.device) -> str | None:
    from dms_kernels import cpu

    return cpu.unavailable_reason(dev)


register("torch", TorchKernels, lambda dev: True, priority=0)
# the fused C++ kernels (dms_kernels._cpu) behind the same ops, impl="cpu"; the projection stays torch
register("cpu", lambda: OpKernels("cpu"), native=lambda dev: _cpu_reason(dev) is None, priority=5)
register("triton", lambda: OpKernels("triton"),
         native=lambda dev: dev.type == "cuda" and _has_triton(),
         runnable=lambda dev: _has_triton() and (dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"),
         priority=10)
register("cuda", lambda: OpKernels("cuda"), native=_cuda_ready, runnable=_cuda_ready, priority=20)


def names() -> list[str]:
    return sorted(_REGISTRY)


def resolve(name: str, device) -> PagedKernels:
    """The kernel set ``name`` ("auto" or a registered name) on ``device``: the only place
    ``PagedConfig.attention`` is interpreted."""
    device = torch.device(device)
    if name == "auto":
        name = max((e.priority, n) for n, e in _REGISTRY.items() if e.native(device))[1]
    elif name not in _REGISTRY:
        raise ValueError(f"attention: unknown backend {name!r}; available: auto, {', '.join(names())}")
    elif not _REGISTRY[name].runnable(device):
        hint = {"triton": " (on CPU set TRITON_INTERPRET=1)", "cuda": f" ({_cuda_reason(device)})",
                "cpu": f" ({_cpu_reason(device)})"}.get(name, "")
        raise ValueError(f"attention: backend {name!r} cannot run on {device}{hint}")
    return _REGISTRY[name].make()
