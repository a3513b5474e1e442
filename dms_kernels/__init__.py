"""dms_kernels: the DMS reference (plain PyTorch) and the kernels that are tested against it."""

from . import reference

__all__ = ["reference"]
