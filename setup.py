"""Installs dms_kernels (reference + kernels) and dms_runtime; builds csrc/ through CMake when nvcc exists.

DMS_BUILD_CUDA=0|1|auto (default auto): 0 never builds the CUDA module, 1 requires it,
auto builds it when nvcc is found. torch is never a build requirement.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def tool(name):
    """Prefer the tool installed beside this interpreter (pinned cmake / ninja wheels)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        mode = os.environ.get("DMS_BUILD_CUDA", "auto").lower()
        if mode not in ("0", "1", "auto"):
            raise SystemExit(f"DMS_BUILD_CUDA: expected 0, 1 or auto, got {mode!r}")
        nvcc = find_nvcc()
        if mode == "0" or (mode == "auto" and nvcc is None):
            print(f"dms: not building the CUDA module (DMS_BUILD_CUDA={mode}, nvcc={'found' if nvcc else 'not found'})")
            return
        if nvcc is None:
            raise SystemExit("DMS_BUILD_CUDA=1 but nvcc was not found (set CUDACXX or CUDA_HOME)")
        for ext in self.extensions:
            self.build_cmake(ext, nvcc)

    def build_cmake(self, ext, nvcc):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake, ninja = tool("cmake"), tool("ninja")
        if cmake is None:
            raise SystemExit("cmake not found: pip install cmake")
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DDMS_PYTHON_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        subprocess.run(args, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--target", "_cuda", "-j", str(os.cpu_count() or 2)], check=True)


setup(
    name="dms",
    version="0.1.0",
    description="Dynamic Memory Sparsification: reference, kernels and runtime",
    python_requires=">=3.10",
    packages=["dms_kernels", "dms_runtime", "dms_runtime.models",
              "dms_runtime.oracle", "dms_runtime.paged", "dms_runtime.engine", "dms_runtime.retrofit",
              "dms_runtime.serve", "dms_runtime.parallel", "dms_kernels.triton"],
    package_dir={"dms_kernels": "dms_kernels", "dms_runtime": "python/dms_runtime"},
    # the shipped DMS retrofits: adapter weights (a few hundred KB) + settings + recipe
    package_data={"dms_runtime": ["adapters/*/*.safetensors", "adapters/*/*.json", "adapters/*/*.md",
                                  "adapters/*/*.jsonl"]},
    ext_modules=[CMakeExtension("dms_kernels._cuda")],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["dms = dms_runtime.cli:main"]},
    zip_safe=False,
)
