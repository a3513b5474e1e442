"""Torch custom ops of the DMS kernels (``torch.ops.dms.*``).

Each op has a fake (meta) implementation, so ``torch.compile`` and CUDA graphs can trace and
capture it. On CUDA the Triton kernels run; on CPU the ops run the same kernels under
``TRITON_INTERPRET=1`` (tests) and refuse otherwise.
"""

from __future__ import annotations

import torch

from .triton.common import interpreting


def _runnable(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"q: the dms Triton ops run on CUDA tensors (or on CPU with TRITON_INTERPRET=1), got {t.device}")


@torch.library.custom_op("dms::paged_attention", mutates_args=())
def paged_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    new_evict: torch.Tensor,
    n_new: torch.Tensor,
    starts: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    kept_len: torch.Tensor,
    ring_evict: torch.Tensor,
    window: int,
    ring_pages: int,
    scale: float | None = None,
) -> torch.Tensor:
    """DMS attention of new tokens over a paged cache (see docs/ARCHITECTURE.md): the split-K
    decode kernel for one token per sequence, the chunk kernel otherwise. Returns q's shape."""
    _runnable(q)
    from .triton.attention_op import triton_paged_attention

    return triton_paged_attention(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len,
                                  ring_evict, window, ring_pages, scale)


@paged_attention.register_fake
def _(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len, ring_evict, window, ring_pages,
      scale=None):
    return torch.empty_like(q)


def paged_attention_op(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len, ring_evict,
                       window, ring_pages, scale=None):
    """The paged runtime's attention signature, through ``torch.ops.dms.paged_attention``."""
    return torch.ops.dms.paged_attention(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len,
                                         ring_evict, window, ring_pages, scale)


@torch.library.custom_op("dms::paged_store", mutates_args=("k_pool", "v_pool", "ring_evict"))
def paged_store(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    new_evict: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_table: torch.Tensor,
    ring_evict: torch.Tensor,
    lists: torch.Tensor,
    kept0: torch.Tensor,
    starts: torch.Tensor,
    n_new: torch.Tensor,
    window: int,
    ring_pages: int,
) -> None:
    """Data movement of a store step (pages allocated beforehand): tokens leaving the window to the
    kept store if kept, the new tokens inside the window into their ring slots."""
    _runnable(k_new)
    from .triton.store_op import paged_store as launch

    launch(k_new, v_new, new_evict, k_pool, v_pool, page_table, ring_evict, lists, kept0, starts, n_new, window,
           ring_pages)


@paged_store.register_fake
def _(k_new, v_new, new_evict, k_pool, v_pool, page_table, ring_evict, lists, kept0, starts, n_new, window, ring_pages):
    return None


def paged_store_op(*args):
    return torch.ops.dms.paged_store(*args)
