"""Paged DMS attention with the Triton kernels: the split-K decode kernel for one new token per
sequence, the chunk kernel otherwise. Same signature as the torch implementation
(``dms_runtime.paged.torch_kernels.torch_paged_attention``)."""

from __future__ import annotations

import math

import torch

from .common import cdiv, dot_settings, next_pow2
from .decode_op import paged_decode_attention
from .paged_prefill import paged_prefill_kernel


def prefill_config(dtype: torch.dtype, head_dim: int, group: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_G, num_warps): 64 packed rows (GQA heads x queries) per tile;
    sizes that build for sm_90a without spills (checked in CI by the AOT test)."""
    block_g = next_pow2(group)
    rows = 64 if dtype != torch.float32 else (32 if head_dim <= 64 else 16)
    block_m = max(1, rows // block_g)
    warps = 4 if dtype == torch.float32 and head_dim > 64 and block_g >= 8 else 8
    return block_m, 16, block_g, warps


def _check_inputs(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len, ring_evict, window):
    if q.dim() != 4:
        raise ValueError(f"q: expected [B, Hq, T, D], got shape {tuple(q.shape)}")
    b, hq, t, d = q.shape
    dev = q.device
    for name, x, shape in (("k_new", k_new, None), ("v_new", v_new, None)):
        if x.dim() != 4 or x.shape[0] != b or x.shape[2] != t or x.shape[3] != d or hq % x.shape[1]:
            raise ValueError(f"{name}: expected [B={b}, H, T={t}, D={d}] with Hq={hq} a multiple of H, got {tuple(x.shape)}")
    h = k_new.shape[1]
    checks = (("new_evict", new_evict, (b, h, t), torch.bool), ("n_new", n_new, (b,), torch.int64),
              ("starts", starts, (b,), torch.int64), ("kept_len", kept_len, (b, h), torch.int64),
              ("ring_evict", ring_evict, (b, h, window), torch.bool))
    for name, x, shape, dtype in checks:
        if tuple(x.shape) != shape or x.dtype != dtype:
            raise ValueError(f"{name}: expected {dtype} of shape {shape}, got {x.dtype} {tuple(x.shape)}")
    if table.dim() != 3 or table.shape[:2] != (b, h) or table.dtype != torch.int64:
        raise ValueError(f"table: expected int64 [B={b}, H={h}, TW], got {table.dtype} {tuple(table.shape)}")
    for name, x in (("k_pool", k_pool), ("v_pool", v_pool)):
        if x.dim() != 3 or x.shape[2] != d or x.dtype != q.dtype or not x.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous [P, PS, {d}] {q.dtype} pool, got {x.dtype} {tuple(x.shape)}")
    for name, x in (("k_new", k_new), ("v_new", v_new), ("k_pool", k_pool), ("table", table), ("starts", starts)):
        if x.device != dev:
            raise ValueError(f"{name}: expected device {dev}, got {x.device}")
    if d & (d - 1) or d < 16:
        raise ValueError(f"q: head dim {d} must be a power of two >= 16")


def triton_paged_attention(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len, ring_evict,
                           window: int, ring_pages: int, scale: float | None = None, max_tokens: int | None = None):
    """``max_tokens``: a host bound on the tokens any list holds (ring + kept) for the decode
    split plan; None reads it from the device (one host sync)."""
    _check_inputs(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len, ring_evict, window)
    b, hq, t, d = q.shape
    h = k_new.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if t == 1:
        n_ring = torch.clamp(starts, max=window)
        out = paged_decode_attention(q[:, :, 0], k_new[:, :, 0], v_new[:, :, 0], k_pool, v_pool, table, n_ring,
                                     kept_len, ring_pages, scale=scale, n_max=max_tokens)
        return out[:, :, None]
    g = hq // h
    block_m, block_n, block_g, warps = prefill_config(q.dtype, d, g)
    q, k_new, v_new = q.contiguous(), k_new.contiguous(), v_new.contiguous()
    tab = table.reshape(b * h, -1).contiguous()
    ring = ring_evict.reshape(b * h, -1).to(torch.int8).contiguous()
    ev = new_evict.to(torch.int8).contiguous()
    out = torch.empty_like(q)
    grid = (b * h, cdiv(t, block_m))
    if b * h:
        paged_prefill_kernel[grid](
            q, k_new, v_new, ev, k_pool, v_pool, tab, ring, kept_len.reshape(-1).contiguous(), starts.contiguous(),
            n_new.contiguous(), out, scale, h, g, ring_pages, window,
            q.stride(0), q.stride(1), q.stride(2), k_new.stride(0), k_new.stride(1), k_new.stride(2),
            ev.stride(0), ev.stride(1), k_pool.stride(0), k_pool.stride(1), tab.stride(0), ring.stride(0),
            out.stride(0), out.stride(1), out.stride(2),
            PS=k_pool.shape[1], D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_G=block_g,
            num_warps=warps, **dot_settings(q.dtype),
        )
    return out

