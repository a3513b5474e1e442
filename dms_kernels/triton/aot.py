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
                "DOT_FP32": "constexpr", "PRECISION": "constexpr",
            }
            block_n, warps = decode_config(torch_dtype[dtype], d)
            const = {"PS": 16, "D": d, "BLOCK_N": block_n, "BLOCK_G": 16, "DOT_FP32": dtype == "fp32", "PRECISION": "tf32x3"}
            out.append(KernelSpec(f"paged_decode[{dtype},D={d},G={g}]", k, sig, const, num_warps=warps))
    return out


def prefill_specs() -> list[KernelSpec]:
    import torch

    from .attention_op import prefill_config
    from .paged_prefill import paged_prefill_kernel as k

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    out = []
    for dtype in ("fp16", "bf16", "fp32"):
        for d, g in ((64, 4), (128, 8), (128, 1), (64, 3)):
            sig = {
                "Q": f"*{dtype}", "KNew": f"*{dtype}", "VNew": f"*{dtype}", "NewEvict": "*i8",
                "KPool": f"*{dtype}", "VPool": f"*{dtype}", "Table": "*i64", "RingEvict": "*i8", "Kept": "*i64",
                "Starts": "*i64", "NNew": "*i64", "Out": f"*{dtype}", "scale": "fp32",
                "H": "i32", "G": "i32", "R": "i32", "W": "i32",
                **{name: "i32" for name in ("stride_qb", "stride_qh", "stride_qt", "stride_kb", "stride_kh",
                                            "stride_kt", "stride_eb", "stride_eh", "stride_pp", "stride_po",
                                            "stride_t", "stride_rw", "stride_ob", "stride_oh", "stride_ot")},
                "PS": "constexpr", "D": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                "BLOCK_G": "constexpr", "DOT_FP32": "constexpr", "PRECISION": "constexpr",
            }
            bm, bn, bg, warps = prefill_config(torch_dtype[dtype], d, g)
            const = {"PS": 16, "D": d, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_G": bg, "DOT_FP32": dtype == "fp32", "PRECISION": "tf32x3"}
            out.append(KernelSpec(f"paged_prefill[{dtype},D={d},G={g}]", k, sig, const, num_warps=warps))
    return out


def store_specs() -> list[KernelSpec]:
    from .paged_store import paged_store_kernel as k
    from .store_op import store_block

    out = []
    for dtype in ("fp16", "bf16", "fp32"):
        for d in (64, 128):
            for block in sorted({store_block(d, 1), store_block(d, 64)}):
                sig = {
                    "KNew": f"*{dtype}", "VNew": f"*{dtype}", "NewEvict": "*i8", "KPool": f"*{dtype}",
                    "VPool": f"*{dtype}", "Table": "*i64", "RingEvict": "*i8", "Lists": "*i64", "Kept": "*i64",
                    "Starts": "*i64", "NNew": "*i64", "H": "i32", "R": "i32", "W": "i32",
                    **{name: "i32" for name in ("stride_kb", "stride_kh", "stride_kt", "stride_eb", "stride_eh",
                                                "stride_pp", "stride_po", "stride_t", "stride_rw")},
                    "PS": "constexpr", "D": "constexpr", "BLOCK": "constexpr",
                }
                out.append(KernelSpec(f"paged_store[{dtype},D={d},BLOCK={block}]", k, sig,
                                      {"PS": 16, "D": d, "BLOCK": block}, num_warps=4))
    return out


def project_specs() -> list[KernelSpec]:
    from .project import project_kernel as k

    out = []
    for dtype in ("fp16", "bf16", "fp32"):
        for d in (64, 128):
            for variant in ("borrowed", "adapter", "none"):
                for qk_norm in (False, True):
                    sig = {
                        "QRaw": f"*{dtype}", "KRaw": f"*{dtype}", "QNormW": f"*{dtype}", "KNormW": f"*{dtype}",
                        "Cos": "*fp32", "Sin": "*fp32", "AdapterLogits": "*fp32", "QOut": f"*{dtype}",
                        "KOut": f"*{dtype}", "Logits": "*fp32", "RingEvict": "*i8", "Lists": "*i64", "Starts": "*i64",
                        "NNew": "*i64", "T": "i32", "HQ": "i32", "H": "i32", "G": "i32", "W": "i32", "eps": "fp32",
                        "scale": "fp32", "offset": "fp32", "sinks": "i32", "stride_rw": "i32",
                        "D": "constexpr", "QK_NORM": "constexpr", "BORROWED": "constexpr", "ADAPTER": "constexpr",
                    }
                    const = {"D": d, "QK_NORM": qk_norm, "BORROWED": variant == "borrowed", "ADAPTER": variant == "adapter"}
                    out.append(KernelSpec(f"fused_project[{dtype},D={d},{variant},qk_norm={qk_norm}]", k, sig, const))
    return out


def compile_for_hopper(spec: KernelSpec):
    src = ASTSource(spec.fn, spec.signature, spec.constexprs)
    return triton.compile(src, target=HOPPER, options={"num_warps": spec.num_warps})


def all_specs() -> list[KernelSpec]:
    return decode_specs() + prefill_specs() + store_specs() + project_specs()


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack (spills / local memory) and shared memory of a cubin, via the cuobjdump
    that Triton's package carries."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def main() -> int:
    """Compile every kernel for sm_90a and print one JSON line per kernel (run without
    TRITON_INTERPRET: the interpreter replaces the kernels)."""
    import json
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET to compile ahead of time")
    ok = True
    for spec in all_specs():
        kernel = compile_for_hopper(spec)
        res = resource_usage(kernel.asm["cubin"])
        sm90a = ".target sm_90a" in kernel.asm["ptx"]
        ok &= sm90a and res.get("stack", 1) == 0 and res.get("local", 1) == 0
        print(json.dumps({"kernel": spec.name, "sm_90a": sm90a, "num_warps": spec.num_warps, **res}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
