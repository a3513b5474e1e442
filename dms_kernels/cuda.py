"""Torch-facing wrappers over the hand-written CUDA kernels (``dms_kernels._cuda``, sm_90a).

The extension is optional: it is built only where nvcc exists. ``available()`` says whether
it was built and a device can run it; without a device every call raises a clear error.
"""

from __future__ import annotations

import torch

try:
    from . import _cuda  # type: ignore[attr-defined]
except ImportError as _e:  # not built on this machine
    _cuda = None
    _IMPORT_ERROR = str(_e)
else:
    _IMPORT_ERROR = None


def built() -> bool:
    """Whether the CUDA module was compiled into this installation."""
    return _cuda is not None


def device_count() -> int:
    return _cuda.device_count() if _cuda is not None else 0


def available() -> bool:
    return built() and device_count() > 0


def _require() -> None:
    if _cuda is None:
        raise RuntimeError(f"dms_kernels._cuda is not built (install with nvcc present, DMS_BUILD_CUDA=1): {_IMPORT_ERROR}")


def eviction_decisions(logits: torch.Tensor) -> torch.Tensor:
    """CUDA version of :func:`dms_kernels.reference.eviction_decisions` for float32 ``[B, Hkv, T]``."""
    _require()
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits: expected a 3-D tensor [B, Hkv, T], got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype != torch.float32:
        raise ValueError(f"logits: expected dtype torch.float32, got {logits.dtype}")
    if logits.device.type != "cuda":
        raise ValueError(f"logits: expected a CUDA tensor, got device {logits.device}")
    logits = logits.contiguous()
    out = torch.empty(logits.shape, dtype=torch.uint8, device=logits.device)
    b, h, t = logits.shape
    stream = torch.cuda.current_stream(logits.device).cuda_stream
    _cuda.eviction_decisions(logits.data_ptr(), out.data_ptr(), b * h, t, stream)
    return out.bool()
