"""The CUDA module builds for sm_90a where nvcc exists, imports without a GPU, and says so cleanly."""

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import dms_kernels
from dms_kernels import cuda as dcuda
from dms_kernels import reference as ref
from dms_kernels.device import cuda_devices

NVCC = shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")
EXPECT_BUILT = bool(NVCC) and os.environ.get("DMS_BUILD_CUDA", "auto") != "0"
needs_build = pytest.mark.skipif(not EXPECT_BUILT, reason="nvcc not found (or DMS_BUILD_CUDA=0): the CUDA module is not built")
needs_gpu = pytest.mark.skipif(not (dcuda.available() and torch.cuda.is_available()), reason="no CUDA device")


@needs_build
def test_module_was_built_and_imports():
    assert dcuda.built(), "nvcc is present, so `pip install -e .` must have built dms_kernels._cuda"
    assert dcuda._cuda.ARCH == "sm_90a"


@needs_build
def test_binary_holds_sm90a_code():
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    so = glob.glob(str(Path(dms_kernels.__file__).parent / "_cuda*.so"))
    assert so, "no _cuda*.so next to dms_kernels"
    out = subprocess.run([str(cuobjdump), "-elf", so[0]], capture_output=True, text=True, check=True).stdout
    assert "arch = sm_90a" in out
    assert "eviction_decisions_kernel" in out


@needs_build
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_device_calls_fail_cleanly():
    assert dcuda.device_count() == 0 and not dcuda.available()
    assert cuda_devices() == []
    with pytest.raises(RuntimeError, match="DMS_ERROR_NO_DEVICE: .*no CUDA device"):
        dcuda._cuda.eviction_decisions(1, 2, 3, 4, 0)
    with pytest.raises(ValueError, match="rows: expected >= 0"):
        dcuda._cuda.eviction_decisions(1, 2, -1, 4, 0)
    with pytest.raises(ValueError, match="logits: expected a CUDA tensor"):
        dcuda.eviction_decisions(torch.zeros(1, 2, 3))


@needs_gpu
def test_eviction_decisions_on_gpu_match_reference():
    for b, h, t in [(1, 1, 1), (3, 2, 17), (2, 8, 1025)]:
        logits = torch.randn(b, h, t, device="cuda")
        logits[..., ::7] = 0.0  # strict > 0
        assert torch.equal(dcuda.eviction_decisions(logits).cpu(), ref.eviction_decisions(logits.cpu()))
