"""The C ABI as another engine sees it: build and install the CMake package, then build and run
csrc/examples (find_package(dms_kernels) + dms::kernels) against it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def tool(name):
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA library cannot be built here")
def test_installed_package_links_into_an_example(tmp_path):
    cmake, ninja = tool("cmake"), tool("ninja")
    gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    run = lambda *args: subprocess.run(args, check=True, capture_output=True, text=True, timeout=600)  # noqa: E731
    build, prefix = tmp_path / "build", tmp_path / "prefix"
    run(cmake, "-S", str(ROOT), "-B", str(build), *gen, f"-DCMAKE_CUDA_COMPILER={NVCC}", "-DDMS_BUILD_PYTHON=OFF",
        f"-DCMAKE_INSTALL_PREFIX={prefix}", "-DCMAKE_BUILD_TYPE=Release")
    run(cmake, "--build", str(build), "-j", "2")
    run(cmake, "--install", str(build))
    assert (prefix / "include" / "dms" / "dms.h").is_file()
    libdir = next(p for p in (prefix / "lib", prefix / "lib64") if p.exists())
    assert (libdir / "libdms_kernels.a").is_file() and list(libdir.glob("libdms_kernels.so*"))
    assert (libdir / "cmake" / "dms_kernels" / "dms_kernelsConfig.cmake").is_file()

    ex = tmp_path / "example"
    run(cmake, "-S", str(ROOT / "csrc" / "examples"), "-B", str(ex), *gen, f"-DCMAKE_PREFIX_PATH={prefix}",
        f"-DCUDAToolkit_ROOT={Path(NVCC).resolve().parents[1]}")
    run(cmake, "--build", str(ex))
    res = subprocess.run([str(ex / "dms_example")], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "LD_LIBRARY_PATH": str(libdir)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "invalid call: DMS_ERROR_INVALID_ARGUMENT" in res.stdout and "rows: expected >= 0" in res.stdout
    assert "dms_device_count: DMS_" in res.stdout
    assert "decode plan: DMS_SUCCESS" in res.stdout and "split 0 of a 1000-token list: [0, " in res.stdout
    assert "invalid decode: DMS_ERROR_INVALID_ARGUMENT" in res.stdout and "head_dim: expected 64 or 128" in res.stdout
    for header in ("dms.h", "paged_layout.h", "paged_decode.cuh", "paged_store.cuh", "device_utils.cuh"):
        assert (prefix / "include" / "dms" / header).is_file(), header
