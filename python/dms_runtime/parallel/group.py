"""The tensor-parallel process group: one rank per device, started by ``torchrun``.

Tensor parallelism uses every process of the job (``WORLD_SIZE == tensor_parallel``). Activations
travel on the compute group (NCCL on CUDA, gloo on CPU); the engine's control messages (the
step rank 0 scheduled, free-page counts, live-token counts) travel on a gloo group on the host,
so they never wait behind GPU work and never need a device copy.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_GROUPS: dict[tuple[int, str], "TPGroup"] = {}


@dataclass(slots=True)
class TPGroup:
    rank: int
    size: int
    device: torch.device  # this rank's device (cuda:LOCAL_RANK on GPUs)
    backend: str  # "nccl" | "gloo": the compute group's backend
    group: object  # compute process group: the all-reduces of o_proj and down_proj
    ctrl: object  # gloo process group: scheduler decisions and counters

    @property
    def is_driver(self) -> bool:
        """Rank 0 schedules, samples and talks to the user; the others follow."""
        return self.rank == 0


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def init_tensor_parallel(size: int, device: torch.device, timeout_s: float = 600.0) -> TPGroup:
    """Join (or start) the process group of a ``tensor_parallel=size`` run and check it fits.

    Under ``torchrun`` the rendezvous comes from RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
    MASTER_PORT. A group already initialised by the caller is used as it is.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel: expected an int >= 1, got {size!r}")
    cuda = device.type == "cuda"
    if not dist.is_initialized():
        world = _env_int("WORLD_SIZE")
        if world is None:
            raise ValueError(
                f"tensor_parallel={size}: needs {size} processes, but this one was not started by torchrun "
                f"(WORLD_SIZE is unset); launch with `torchrun --nproc_per_node {size} ...`")
        if world != size:
            raise ValueError(f"tensor_parallel={size}: the job has WORLD_SIZE={world} processes; tensor parallelism "
                             f"uses all of them, so give tensor_parallel={world} or start {size} processes")
        if cuda:
            local = _env_int("LOCAL_RANK") or 0
            if local >= torch.cuda.device_count():
                raise ValueError(f"tensor_parallel={size}: LOCAL_RANK={local} but this node has "
                                 f"{torch.cuda.device_count()} CUDA devices")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world != size:
        raise ValueError(f"tensor_parallel={size}: the process group has {world} ranks; tensor parallelism uses "
                         f"all of them, so give tensor_parallel={world}")
    backend = dist.get_backend()
    if cuda:
        if backend != "nccl":
            raise ValueError(f"device: {device} needs an NCCL process group, the group uses {backend!r}")
        if device.index is None:  # one GPU per process: LOCAL_RANK's, as torchrun numbers them
            local = _env_int("LOCAL_RANK")
            device = torch.device("cuda", torch.cuda.current_device() if local is None else local)
        torch.cuda.set_device(device)
    key = (size, device.type)
    if key in _GROUPS:
        return _GROUPS[key]
    ctrl = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo")
    tp = TPGroup(dist.get_rank(), world, device, backend, dist.group.WORLD, ctrl)
    _GROUPS[key] = tp
    return tp


@contextlib.contextmanager
def rank_zero_first(tp: TPGroup | None):
    """Rank 0 runs the body first (e.g. converts a GGUF file into the cache), then the others."""
    if tp is None or tp.size == 1:
        yield
        return
    if tp.rank != 0:
        dist.barrier(group=tp.ctrl)
    try:
        yield
    finally:
        if tp.rank == 0:
            dist.barrier(group=tp.ctrl)


def close() -> None:
    """Leave the process group (end of a torchrun job)."""
    _GROUPS.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
