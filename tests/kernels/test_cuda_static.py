"""Static checks of the CUDA kernels for sm_90a without a GPU (python -m dms_kernels.cuda_static_check):
ptxas resources (no spills, no stack), SASS made of bulk copies / ldmatrix / HMMA in the decode
loop and 16-byte moves in the store kernel, no local memory; the built module holds them."""

import json
import subprocess
import sys

import pytest

from dms_kernels import cuda as dcuda
from dms_kernels.cuda_static_check import count_ops, find_cuobjdump, find_nvcc, parse_ptxas, parse_sass

needs_tools = pytest.mark.skipif(find_nvcc() is None or find_cuobjdump() is None,
                                 reason="nvcc or cuobjdump not found: the CUDA kernels cannot be compiled here")


@needs_tools
@pytest.mark.skipif(not dcuda.built(), reason="dms_kernels._cuda is not built")
def test_kernels_compile_for_sm90a_with_bulk_copies_and_no_spills(tmp_path):
    out = tmp_path / "resources.jsonl"
    run = subprocess.run([sys.executable, "-m", "dms_kernels.cuda_static_check", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_name = {r["kernel"]: r for r in rows}
    split = [r for n, r in by_name.items() if "paged_decode_split_kernel" in n]
    merge = [r for n, r in by_name.items() if "paged_decode_merge_kernel" in n]
    store = [r for n, r in by_name.items() if "paged_store_kernel" in n]
    assert len(split) == 4 and len(merge) == 4 and len(store) == 1, sorted(by_name)
    for r in rows:
        assert r["stack_bytes"] == 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["sass"]["LDL"] == 0 and r["sass"]["STL"] == 0, r
        assert 0 < r["registers"] <= 255 and not r["problems"], r
    for r in split:
        assert r["in_loop"]["UBLKCP"] >= 2 and r["in_loop"]["LDSM"] > 0 and r["in_loop"]["HMMA"] > 0, r
        assert r["sass"]["BPT.TRAP"] > 0, r  # bounded mbarrier waits: a pipeline bug traps, never hangs
        assert r["smem_dynamic"] and r["smem_dynamic"] + r["smem_static"] <= 227 * 1024, r
        # two CTAs per SM fit (228 KB per SM, 1 KB reserved per CTA)
        assert 2 * (r["smem_dynamic"] + r["smem_static"] + 1024) <= 228 * 1024, r
    assert store[0]["in_loop"]["LDG.E.128"] > 0 and store[0]["in_loop"]["STG.E.128"] > 0


def test_parsers_on_known_text():
    ptxas = """ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'
ptxas info    : Function properties for _Z1kv
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem, 400 bytes cmem[0]"""
    assert parse_ptxas(ptxas) == {"_Z1kv": {"arch": "sm_90a", "stack": 8, "spill_stores": 4, "spill_loads": 4,
                                            "registers": 40, "barriers": 1, "smem": 128}}
    sass = """        Function : _Z1kv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   UBLKCP.S.G [UR4], [UR6], UR8 ;
        /*0020*/              @!P0 BRA 0x10 ;
        /*0030*/                   STL [R1], R2 ;
        /*0040*/                   EXIT ;"""
    instrs = parse_sass(sass)["_Z1kv"]
    assert len(instrs) == 5
    assert count_ops(instrs)["UBLKCP"] == 1 and count_ops(instrs)["STL"] == 1
    assert count_ops(instrs, loops_only=True)["UBLKCP"] == 1 and count_ops(instrs, loops_only=True)["STL"] == 0
