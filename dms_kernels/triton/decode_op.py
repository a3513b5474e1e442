"""Wrapper of the paged decode kernel: validation, split planning, launch, log-sum-exp merge."""

from __future__ import annotations

import math

import torch

from .common import dot_settings, next_pow2
from .paged_decode import paged_decode_split_kernel


def decode_config(dtype: torch.dtype, head_dim: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) that build for sm_90a without spills (checked in CI by the AOT test)."""
    if dtype == torch.float32:
        return 16, 8
    return (64, 8) if head_dim <= 64 else (32, 8)


def plan_splits(n_tokens_max: int, num_lists: int, *, block_n: int = 64, target_programs: int = 264) -> int:
    """Tokens per split: enough programs to fill the GPU (2 waves of 132 SMs) even at batch 1,
    never less than one block. Lists shorter than a split simply launch fewer working programs."""
    if n_tokens_max <= 0:
        return block_n
    splits_wanted = max(1, math.ceil(target_programs / max(num_lists, 1)))
    split = math.ceil(n_tokens_max / splits_wanted)
    return max(block_n, math.ceil(split / block_n) * block_n)


def _check(name, t, ndim, dtype=None, device=None):
    if not isinstance(t, torch.Tensor) or t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {getattr(t, 'shape', type(t))}")
    if dtype is not None and t.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
        raise ValueError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")


def paged_decode_attention(q, k_new, v_new, k_pool, v_pool, table, n_ring, kept_len, ring_pages: int,
                           scale: float | None = None, block_n: int | None = None, n_max: int | None = None):
    """One new query per sequence over its held tokens plus its own new key.

    q ``[B, Hq, D]``; k_new/v_new ``[B, H, D]``; k_pool/v_pool ``[P, PS, D]``; table ``[B, H, TW]``
    int64 page ids; n_ring ``[B]`` int64 ring tokens held; kept_len ``[B, H]`` int64. ``n_max``: a
    host bound on ``n_ring + kept_len`` (e.g. the engine's step plan, the same for every layer);
    None reads the longest list from the device (one host sync). A loose bound only launches
    splits that find nothing (weight 0 in the merge).
    Returns ``[B, Hq, D]`` in q's dtype.
    """
    _check("q", q, 3, (torch.float32, torch.float16, torch.bfloat16))
    dev = q.device
    b, hq, d = q.shape
    _check("k_new", k_new, 3, q.dtype, dev)
    _check("v_new", v_new, 3, q.dtype, dev)
    h = k_new.shape[1]
    if hq % h or k_new.shape != (b, h, d) or v_new.shape != k_new.shape:
        raise ValueError(f"k_new/v_new: expected shape ({b}, H, {d}) with Hq={hq} a multiple of H, got {tuple(k_new.shape)}")
    _check("k_pool", k_pool, 3, q.dtype, dev)
    _check("v_pool", v_pool, 3, q.dtype, dev)
    if k_pool.shape[2] != d or v_pool.shape != k_pool.shape:
        raise ValueError(f"k_pool/v_pool: expected shape [P, PS, {d}], got {tuple(k_pool.shape)}")
    if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError("k_pool/v_pool: expected contiguous pools")
    _check("table", table, 3, torch.int64, dev)
    _check("n_ring", n_ring, 1, torch.int64, dev)
    _check("kept_len", kept_len, 2, torch.int64, dev)
    if table.shape[:2] != (b, h) or n_ring.shape[0] != b or kept_len.shape != (b, h):
        raise ValueError("table/n_ring/kept_len: expected [B, H, TW], [B], [B, H] matching q")
    if d & (d - 1):
        raise ValueError(f"q: head dim {d} must be a power of two")
    g = hq // h
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    default_n, num_warps = decode_config(q.dtype, d)
    block_n = block_n or default_n
    q = q.contiguous()
    tab = table.reshape(b * h, -1).contiguous()
    kept = kept_len.reshape(-1).contiguous()
    if n_max is None:
        n_max = int((n_ring[:, None] + kept_len).max()) if b else 0
    split = plan_splits(n_max, b * h, block_n=block_n)
    s = max(1, math.ceil(n_max / split))
    acc = torch.empty((b * h, s, g, d), dtype=torch.float32, device=dev)
    m = torch.empty((b * h, s, g), dtype=torch.float32, device=dev)
    lsum = torch.empty((b * h, s, g), dtype=torch.float32, device=dev)
    if b * h:
        paged_decode_split_kernel[(b * h, s)](
            q, k_pool, v_pool, tab, n_ring.contiguous(), kept, acc, m, lsum,
            scale, h, g, ring_pages, split,
            q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), tab.stride(0),
            acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1),
            PS=k_pool.shape[1], D=d, BLOCK_N=block_n, BLOCK_G=max(16, next_pow2(g)),
            num_warps=num_warps, **dot_settings(q.dtype),
        )
    # merge the splits and the new token by log-sum-exp (an empty split has m = -inf: weight 0)
    qf = q.float().view(b, h, g, d)
    s_new = (qf * k_new.float()[:, :, None, :]).sum(-1) * scale  # [B, H, G]
    m = m.view(b, h, s, g)
    top = torch.maximum(m.amax(2), s_new)  # finite: the new token is always there
    w_split = torch.exp(m - top[:, :, None, :])
    w_new = torch.exp(s_new - top)
    num = (w_split[..., None] * acc.view(b, h, s, g, d)).sum(2) + w_new[..., None] * v_new.float()[:, :, None, :]
    den = (w_split * lsum.view(b, h, s, g)).sum(2) + w_new
    return (num / den[..., None]).reshape(b, hq, d).to(q.dtype)

