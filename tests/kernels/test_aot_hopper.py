"""Every Triton kernel builds for sm_90a ahead of time (no GPU needed); resources are recorded."""

import re
import subprocess
from pathlib import Path

import pytest

from dms_kernels.triton.aot import all_specs, compile_for_hopper


@pytest.mark.parametrize("spec", all_specs(), ids=lambda s: s.name)
def test_compiles_for_sm90a_without_spills(spec, tmp_path):
    import triton

    kernel = compile_for_hopper(spec)
    assert ".target sm_90a" in kernel.asm["ptx"]
    cubin = tmp_path / "k.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    res = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    assert regs and int(regs.group(1)) <= 255, res
    assert re.search(r"STACK:0\b", res), f"local memory / spills in {spec.name}: {res}"
