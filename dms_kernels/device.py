"""CUDA device discovery through cuda-python's driver bindings, independent of torch's build."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory_bytes: int

    @property
    def is_hopper(self) -> bool:
        return self.compute_capability == (9, 0)


def cuda_devices() -> list[DeviceInfo]:
    """The CUDA devices the driver reports; ``[]`` when there is no driver or no device."""
    try:
        from cuda.bindings import driver
    except ImportError:  # cuda-python not installed
        return []
    try:
        (err,) = driver.cuInit(0)
    except Exception:  # no libcuda.so on this machine
        return []
    if err != driver.CUresult.CUDA_SUCCESS:
        return []
    err, count = driver.cuDeviceGetCount()
    if err != driver.CUresult.CUDA_SUCCESS:
        return []
    out = []
    attr = driver.CUdevice_attribute
    for i in range(count):
        _, dev = driver.cuDeviceGet(i)
        _, raw = driver.cuDeviceGetName(64, dev)
        _, major = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
        _, minor = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
        _, mem = driver.cuDeviceTotalMem(dev)
        name = raw.split(b"\0", 1)[0].decode(errors="replace")
        out.append(DeviceInfo(i, name, (major, minor), int(mem)))
    return out
