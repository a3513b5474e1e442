"""Installs dms_kernels (reference + kernels) and dms_runtime; builds the compiled kernels.

DMS_BUILD_CUDA=0|1|auto (default auto): 0 never builds the CUDA module (csrc/ through CMake),
1 requires it, auto builds it when nvcc is found.
DMS_BUILD_CPU=0|1|auto (default auto): the CPU kernels (csrc/cpu/, dms_kernels._cpu, pybind11 and
a C++17 compiler, OpenMP where the compiler has it); 0 skips them, 1 makes a failed build an error,
auto builds them where it can (the runtime falls back to torch without them).
torch is never a build requirement.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.errors import CCompilerError, CompileError, LinkError
except ImportError:  # older setuptools
    from distutils.errors import CCompilerError, CompileError, LinkError

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


def build_mode(name):
    mode = os.environ.get(name, "auto").lower()
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"{name}: expected 0, 1 or auto, got {mode!r}")
    return mode


def cpu_extension():
    """dms_kernels._cpu (csrc/cpu/): pybind11 over raw pointers, -O3, OpenMP."""
    try:
        import pybind11
    except ImportError:
        return None
    return Extension(
        "dms_kernels._cpu", sources=["csrc/cpu/dms_cpu.cpp"], include_dirs=[pybind11.get_include()], language="c++",
        extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-fopenmp"], extra_link_args=["-fopenmp"],
    )


class Build(build_ext):
    """The CUDA module through CMake, the CPU module with the C++ compiler; each optional by mode."""

    def run(self):
        cuda_mode, cpu_mode = build_mode("DMS_BUILD_CUDA"), build_mode("DMS_BUILD_CPU")
        self.nvcc = find_nvcc()
        keep = []
        for ext in self.extensions:
            if isinstance(ext, CMakeExtension):
                if cuda_mode == "0" or (cuda_mode == "auto" and self.nvcc is None):
                    print(f"dms: not building the CUDA module (DMS_BUILD_CUDA={cuda_mode}, "
                          f"nvcc={'found' if self.nvcc else 'not found'})")
                    continue
                if self.nvcc is None:
                    raise SystemExit("DMS_BUILD_CUDA=1 but nvcc was not found (set CUDACXX or CUDA_HOME)")
            elif cpu_mode == "0":
                print("dms: not building the CPU kernels (DMS_BUILD_CPU=0)")
                continue
            keep.append(ext)
        self.extensions = keep
        if cpu_mode == "1" and not any(e.name == "dms_kernels._cpu" for e in keep):
            raise SystemExit("DMS_BUILD_CPU=1 but pybind11 is not installed")
        super().run()

    def build_extension(self, ext):
        if isinstance(ext, CMakeExtension):
            return self.build_cmake(ext, self.nvcc)
        strict = build_mode("DMS_BUILD_CPU") == "1"
        try:
            return super().build_extension(ext)
        except (CCompilerError, CompileError, LinkError) as e:
            if "-fopenmp" not in ext.extra_compile_args:
                if strict:
                    raise
                print(f"dms: WARNING: the CPU kernels did not build ({e}); the runtime uses torch attention")
                return None
        print("dms: the CPU kernels did not build with OpenMP; building them single-threaded")
        ext.extra_compile_args = [a for a in ext.extra_compile_args if a != "-fopenmp"]
        ext.extra_link_args = [a for a in ext.extra_link_args if a != "-fopenmp"]
        return self.build_extension(ext)

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
    ext_modules=[CMakeExtension("dms_kernels._cuda")] + [e for e in (cpu_extension(),) if e is not None],
    cmdclass={"build_ext": Build},
    entry_points={"console_scripts": ["dms = dms_runtime.cli:main"]},
    zip_safe=False,
)
