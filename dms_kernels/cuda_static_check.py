"""Static checks of the hand-written CUDA kernels for sm_90a, with no GPU.

Compiles every source of csrc/src to a cubin with ``ptxas -v``, records per kernel the
registers, stack frame, spill stores/loads and static shared memory (and the dynamic shared
memory the decode planner asks for), then reads the SASS with the cuobjdump that Triton's
package carries and checks what the kernels are made of:

* no kernel has a stack frame, spills or local-memory instructions (LDL / STL);
* the decode split kernels copy pages with bulk async copies (UBLKCP) and read shared memory with
  ldmatrix (LDSM) feeding tensor-core MMAs (HMMA), all inside a loop of the kernel;
* the decode split kernels' mbarrier waits are bounded (a BPT.TRAP after DMS_MBAR_TIMEOUT_NS), so
  a pipeline mistake fails the launch instead of hanging the GPU;
* the store kernel moves rows with 16-byte loads and stores (LDG.E.128 / STG.E.128);
* the built Python module holds the same kernels (sm_90a, UBLKCP in the decode kernels).

    python -m dms_kernels.cuda_static_check [--out bench/results/<date>-sm90a-cuda-resources.jsonl]

Prints one JSON line per kernel and exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "csrc" / "src"
INCLUDE = ROOT / "csrc" / "include"
OPS = ("UBLKCP", "LDGSTS", "LDG.E.128", "STG.E.128", "LDSM", "HMMA", "SYNCS", "BPT.TRAP", "LDL", "STL")


@dataclass(slots=True)
class KernelReport:
    kernel: str  # demangled, without the parameter list
    mangled: str
    source: str
    registers: int = 0
    stack_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem_static: int = 0
    smem_dynamic: int | None = None
    barriers: int = 0
    sass: dict[str, int] = field(default_factory=dict)
    in_loop: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def find_nvcc() -> str | None:
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def find_cuobjdump() -> str | None:
    try:
        import triton
    except ImportError:
        triton = None
    if triton is not None:
        cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if cand.exists():
            return str(cand)
    return shutil.which("cuobjdump")


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return {n: (_drop_params(d) if d else n) for n, d in zip(names, out)}


def _drop_params(sig: str) -> str:
    """'void ns::k<int>(Params)' -> 'void ns::k<int>' (the parameter list is the last balanced group)."""
    if not sig.endswith(")"):
        return sig
    depth = 0
    for i in range(len(sig) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(sig[i], 0)
        if depth == 0:
            return sig[:i]
    return sig


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")


def parse_ptxas(text: str) -> dict[str, dict]:
    """ptxas -v output -> {mangled name: {arch, registers, stack, spills, smem}}."""
    out: dict[str, dict] = {}
    cur = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            cur = out.setdefault(m.group(1), {"arch": m.group(2)})
        elif cur is not None and (m := _PROPS.search(line)):
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif cur is not None and (m := _USED.search(line)):
            cur.update(registers=int(m.group(1)), barriers=int(m.group(2) or 0), smem=int(m.group(3) or 0))
    return out


_FUNC = re.compile(r"Function : (\S+)")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def parse_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    """cuobjdump -sass output -> {mangled name: [(address, instruction text)]}."""
    out: dict[str, list[tuple[int, str]]] = {}
    cur = None
    for line in text.splitlines():
        if m := _FUNC.search(line):
            cur = out.setdefault(m.group(1), [])
        elif cur is not None and (m := _INSTR.search(line)):
            cur.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def opcode(instr: str) -> str:
    parts = instr.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def count_ops(instrs: list[tuple[int, str]], loops_only: bool = False) -> dict[str, int]:
    """Occurrences of the opcodes of OPS (prefix match: UBLKCP.S.G counts as UBLKCP); with
    loops_only, only instructions inside a loop (between a backward branch and its target)."""
    loops = []
    if loops_only:
        for addr, ins in instrs:
            if opcode(ins) == "BRA" and (m := re.search(r"0x([0-9a-f]+)", ins)):
                target = int(m.group(1), 16)
                if target <= addr:
                    loops.append((target, addr))
    counts = {op: 0 for op in OPS}
    for addr, ins in instrs:
        if loops_only and not any(lo <= addr <= hi for lo, hi in loops):
            continue
        code = opcode(ins)
        for op in OPS:
            if code == op or code.startswith(op + "."):
                counts[op] += 1
    return counts


def compile_cubin(nvcc: str, src: Path, out_dir: Path) -> tuple[Path, str]:
    cubin = out_dir / (src.stem + ".cubin")
    cmd = [nvcc, "-std=c++17", "-O3", "-arch=sm_90a", "-cubin", "-Xptxas", "-v", f"-I{INCLUDE}", "-o", str(cubin),
           str(src)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"nvcc failed on {src.name}:\n{run.stderr[-4000:]}")
    return cubin, run.stderr + run.stdout


def decode_dynamic_smem(name: str) -> int | None:
    """Dynamic shared memory the planner gives a decode split kernel (None for other kernels)."""
    m = re.search(r"paged_decode_split_kernel<(__half|__nv_bfloat16), (\d+), (\d+)>", name)
    if not m:
        return None
    try:
        from . import _cuda  # type: ignore[attr-defined]
    except ImportError:
        return None
    dtype = _cuda.DataType.float16 if m.group(1) == "__half" else _cuda.DataType.bfloat16
    return _cuda.decode_plan(1, 1, int(m.group(2)), dtype, 1, 1).smem_bytes


def check_kernel(r: KernelReport) -> None:
    if r.stack_bytes or r.spill_stores or r.spill_loads:
        r.problems.append(f"stack {r.stack_bytes} B, spill stores {r.spill_stores} B, spill loads {r.spill_loads} B")
    if r.sass.get("LDL") or r.sass.get("STL"):
        r.problems.append(f"local memory instructions: LDL {r.sass.get('LDL')}, STL {r.sass.get('STL')}")
    if r.registers > 255:
        r.problems.append(f"{r.registers} registers")
    if "paged_decode_split_kernel" in r.kernel:
        for op in ("UBLKCP", "LDSM", "HMMA"):
            if not r.in_loop.get(op):
                r.problems.append(f"no {op} inside a loop of the decode kernel")
        if not r.sass.get("BPT.TRAP"):
            r.problems.append("no BPT.TRAP: the mbarrier waits of the decode kernel are unbounded")
    if "paged_store_kernel" in r.kernel:
        for op in ("LDG.E.128", "STG.E.128"):
            if not r.in_loop.get(op):
                r.problems.append(f"no {op} inside a loop of the store kernel")


def check_sources(nvcc: str, cuobjdump: str, work: Path) -> list[KernelReport]:
    reports = []
    for src in sorted(SRC.glob("*.cu")):
        cubin, log = compile_cubin(nvcc, src, work)
        res = parse_ptxas(log)
        sass = parse_sass(subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                                         check=True).stdout)
        names = demangle(sorted(res))
        for mangled, info in sorted(res.items()):
            r = KernelReport(kernel=names[mangled], mangled=mangled, source=str(src.relative_to(ROOT)),
                             registers=info.get("registers", 0), stack_bytes=info.get("stack", 0),
                             spill_stores=info.get("spill_stores", 0), spill_loads=info.get("spill_loads", 0),
                             smem_static=info.get("smem", 0), barriers=info.get("barriers", 0))
            r.smem_dynamic = decode_dynamic_smem(r.kernel)
            instrs = sass.get(mangled, [])
            if info.get("arch") != "sm_90a" or not instrs:
                r.problems.append(f"not compiled for sm_90a (arch {info.get('arch')}, {len(instrs)} instructions)")
            r.sass = count_ops(instrs)
            r.in_loop = count_ops(instrs, loops_only=True)
            check_kernel(r)
            reports.append(r)
    return reports


def check_module(cuobjdump: str) -> list[str]:
    """The built dms_kernels._cuda holds sm_90a decode kernels with bulk copies."""
    so = glob.glob(str(Path(__file__).parent / "_cuda*.so"))
    if not so:
        return ["dms_kernels._cuda is not built"]
    elf = subprocess.run([cuobjdump, "-elf", so[0]], capture_output=True, text=True).stdout
    sass = parse_sass(subprocess.run([cuobjdump, "-sass", so[0]], capture_output=True, text=True).stdout)
    problems = [] if "arch = sm_90a" in elf else ["the module holds no sm_90a code"]
    decode = [n for n in sass if "paged_decode_split_kernel" in n]
    if len(decode) < 4:
        problems.append(f"the module holds {len(decode)} decode split kernels, expected 4 (fp16/bf16 x D 64/128)")
    for n in decode:
        if not count_ops(sass[n], loops_only=True)["UBLKCP"]:
            problems.append(f"{n}: no UBLKCP in a loop")
    if not any("paged_store_kernel" in n for n in sass):
        problems.append("the module holds no store kernel")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" /
                                         f"{datetime.date.today().isoformat()}-sm90a-cuda-resources.jsonl"))
    ap.add_argument("--no-module", action="store_true", help="skip the check of the built Python module")
    args = ap.parse_args(argv)
    nvcc, cuobjdump = find_nvcc(), find_cuobjdump()
    if nvcc is None or cuobjdump is None:
        print(f"nvcc ({nvcc}) and cuobjdump ({cuobjdump}) are both needed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        reports = check_sources(nvcc, cuobjdump, Path(tmp))
    lines = [json.dumps(asdict(r)) for r in reports]
    for line in lines:
        print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    problems = [f"{r.kernel}: {p}" for r in reports for p in r.problems]
    if not args.no_module:
        problems += [f"module: {p}" for p in check_module(cuobjdump)]
    for p in problems:
        print("FAIL", p, file=sys.stderr)
    return 1 if problems or not reports else 0


if __name__ == "__main__":
    sys.exit(main())
