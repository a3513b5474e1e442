"""Settings shared by the Triton kernel wrappers."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_settings(dtype: torch.dtype) -> dict:
    """How ``tl.dot`` treats its operands. fp32 caches, and everything under the CPU interpreter
    (where bf16 dots are silently wrong), dot in fp32: exactly ("ieee") in the interpreter, with
    three tf32 passes (about fp32 accuracy on tensor cores, no register spills) on a GPU."""
    fp32 = dtype == torch.float32 or interpreting()
    return {"DOT_FP32": fp32, "PRECISION": "ieee" if interpreting() else "tf32x3"}


def next_pow2(x: int) -> int:
    return 1 << (int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
