"""Ahead-of-time compilation of the Triton kernels for Hopper (sm_90a), with no GPU.

CI compiles every kernel with the signatures it is launched with, so a kernel that cannot
build for sm_90a fails there; the cubin's resource use (registers, shared memory, spills) is
returned for the record.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)


@dataclass(frozen=True, slots=True)
class KernelSpec:
    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int = 4


def decode_specs() -> list[KernelSpec]:
    import torch

    from .decode_op import decode_config
    from .paged_decode import paged_decode_split_kernel as k

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    out = []
    for dtype in ("fp16", "bf16", "fp32"):
        for d, g in ((64, 4), (128, 8), (128, 1)):
            sig = {
                "Q": f"*{dtype}", "KPool": f"*{dtype}", "VPool": f"*{dtype}", "Table": "*i64", "NRing": "*i64",
                "Kept": "*i64", "Acc": "*fp32", "M": "*fp32", "Lsum": "*fp32", "scale": "fp32",
                "H": "i32", "G": "i32", "R": "i32", "split": "i32",
                "stride_qb": "i32", "stride_qh": "i32", "stride_pp": "i32", "stride_po": "i32", "stride_t": "i32",
                "stride_al": "i32", "stride_as": "i32", "stride_ag": "i32", "stride_ml": "i32", "stride_ms": "i32",
                "PS": "constexpr", "D": "constexpr", "BLOCK_N": "constexpr", "BLOCK_G": "constexpr",
                "DOT_FP32": "constexpr",
            }
            block_n, warps = decode_config(torch_dtype[dtype], d)
            const = {"PS": 16, "D": d, "BLOCK_N": block_n, "BLOCK_G": 16, "DOT_FP32": dtype == "fp32"}
            out.append(KernelSpec(f"paged_decode[{dtype},D={d},G={g}]", k, sig, const, num_warps=warps))
    return out


def compile_for_hopper(spec: KernelSpec):
    src = ASTSource(spec.fn, spec.signature, spec.constexprs)
    return triton.compile(src, target=HOPPER, options={"num_warps": spec.num_warps})


def all_specs() -> list[KernelSpec]:
    return decode_specs()
