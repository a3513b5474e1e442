"""Torch custom ops over the hand-written CUDA kernels: ``torch.ops.dms.cuda_paged_attention`` and
``torch.ops.dms.cuda_paged_store``.

Same schemas as ``torch.ops.dms.paged_attention`` / ``paged_store`` (dms_kernels/ops.py), with
fake implementations for ``torch.compile`` and CUDA graphs. They are separate ops rather than a
second CUDA kernel of the same ones so that the Triton backend stays forcible by name on a
Hopper GPU (benchmarks and tests compare the two on the same device).

Decode (one new token per sequence, fp16/bf16, head dim 64 or 128, group <= 16) runs the CUDA
split-K kernel; everything else (prefill chunks, fp32, other head dims) falls back to the Triton
kernels. The store kernel covers every dtype whose rows are a multiple of 16 bytes.
"""

from __future__ import annotations

import torch

from . import cuda


@torch.library.custom_op("dms::cuda_paged_attention", mutates_args=(), device_types="cuda")
def cuda_paged_attention(
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
    """DMS attention of new tokens over a paged cache (docs/ARCHITECTURE.md); returns q's shape
    ``[B, Hq, T, D]``. CUDA decode kernel for T = 1, the Triton chunk kernel otherwise."""
    b, hq, t, d = q.shape
    h = k_new.shape[1]
    if t == 1 and h and hq % h == 0 and cuda.decode_supported(q.dtype, d, hq // h):
        out = cuda.paged_decode_attention(q[:, :, 0], k_new[:, :, 0], v_new[:, :, 0], k_pool, v_pool, table, starts,
                                          kept_len, window, ring_pages, scale=scale)
        return out[:, :, None]
    from .triton.attention_op import triton_paged_attention

    return triton_paged_attention(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len,
                                  ring_evict, window, ring_pages, scale)


@cuda_paged_attention.register_fake
def _(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len, ring_evict, window, ring_pages,
      scale=None):
    return torch.empty_like(q)


@torch.library.custom_op("dms::cuda_paged_store", mutates_args=("k_pool", "v_pool", "ring_evict"),
                         device_types="cuda")
def cuda_paged_store(
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
    """Data movement of a store step (pages allocated beforehand), as ``dms::paged_store``."""
    if cuda.store_supported(k_new.dtype, k_new.shape[-1]) and k_pool.dtype == k_new.dtype:
        cuda.paged_store(k_new, v_new, new_evict, k_pool, v_pool, page_table, ring_evict, lists, kept0, starts, n_new,
                         window, ring_pages)
        return
    from .triton.store_op import paged_store as launch

    launch(k_new, v_new, new_evict, k_pool, v_pool, page_table, ring_evict, lists, kept0, starts, n_new, window,
           ring_pages)


@cuda_paged_store.register_fake
def _(k_new, v_new, new_evict, k_pool, v_pool, page_table, ring_evict, lists, kept0, starts, n_new, window, ring_pages):
    return None


def cuda_paged_attention_op(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len, ring_evict,
                            window, ring_pages, scale=None):
    """The paged runtime's attention signature, through ``torch.ops.dms.cuda_paged_attention``."""
    return torch.ops.dms.cuda_paged_attention(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table,
                                              kept_len, ring_evict, window, ring_pages, scale)


def cuda_paged_store_op(*args):
    return torch.ops.dms.cuda_paged_store(*args)
