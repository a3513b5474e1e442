"""Launch of the paged store kernel (the data movement of ``PagedKVCache.store``)."""

from __future__ import annotations

import torch

from .paged_store import paged_store_kernel


def store_block(head_dim: int, t: int) -> int:
    """Tokens moved per iteration: sizes that build for sm_90a without spills (AOT test)."""
    return 32 if t > 1 and head_dim <= 64 else 16


def paged_store(k_new, v_new, new_evict, k_pool, v_pool, page_table, ring_evict, lists, kept0, starts, n_new,
                window: int, ring_pages: int) -> None:
    """The mover of ``PagedKVCache.store``: ``page_table`` ``[NL, TW]`` and ``ring_evict``
    ``[NL, w]`` are the cache's whole tensors (the kernel addresses lists by id); ``lists`` and
    ``kept0`` are ``[B, H]``; k_new/v_new ``[B, H, T, D]``; new_evict bool ``[B, H, T]``."""
    b, h, t, d = k_new.shape
    if page_table.dtype != torch.int64 or page_table.dim() != 2:
        raise ValueError(f"page_table: expected int64 [NL, TW], got {page_table.dtype} {tuple(page_table.shape)}")
    if ring_evict.dtype != torch.bool or ring_evict.shape[1] != window:
        raise ValueError(f"ring_evict: expected bool [NL, {window}], got {ring_evict.dtype} {tuple(ring_evict.shape)}")
    if k_pool.dtype != k_new.dtype or not k_pool.is_contiguous():
        raise ValueError(f"k_pool: expected a contiguous {k_new.dtype} pool, got {k_pool.dtype}")
    k_new, v_new = k_new.contiguous(), v_new.contiguous()
    ev = new_evict.to(torch.int8).contiguous()
    ring8 = ring_evict.view(torch.int8)
    if b * h == 0:
        return
    paged_store_kernel[(b * h,)](
        k_new, v_new, ev, k_pool, v_pool, page_table, ring8, lists.reshape(-1).contiguous(),
        kept0.reshape(-1).contiguous(), starts.contiguous(), n_new.contiguous(), h, ring_pages, window,
        k_new.stride(0), k_new.stride(1), k_new.stride(2), ev.stride(0), ev.stride(1),
        k_pool.stride(0), k_pool.stride(1), page_table.stride(0), ring8.stride(0),
        PS=k_pool.shape[1], D=d, BLOCK=store_block(d, t), num_warps=4,
    )
