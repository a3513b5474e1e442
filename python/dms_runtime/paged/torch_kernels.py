"""Paged DMS attention in plain torch (runs anywhere): gather each list's held tokens, apply the
window rule to ring tokens, attend over [held tokens, new chunk] in one softmax (torch SDPA with
a boolean mask, GQA without copying K/V per query head)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .plan import ring_positions


def gather_lists(k_pool, v_pool, table, kept_len, starts, window: int, ring_pages: int, kept_max: int | None = None):
    """Held tokens of each list, padded to ``w + Kmax`` (``kept_max``: a host bound on
    ``kept_len``, e.g. the step plan's; None reads it from the device, one sync).

    table ``[B, H, R + K]`` page ids; kept_len ``[B, H]``; starts ``[B]`` (first new position).
    Returns k, v ``[B, H, w + Kmax, D]`` and pos ``[B, H, w + Kmax]``: the position of a ring
    token, -2 for a kept token (always visible), -1 for nothing.
    """
    b, h, _ = table.shape
    ps, d = k_pool.shape[1], k_pool.shape[2]
    dev = table.device
    w = window
    r = torch.arange(w, device=dev)
    ring_pos = ring_positions(starts, w)[:, None, :].expand(b, h, w)
    ring_page_ids = torch.gather(table, -1, (r // ps).expand(b, h, w))
    ring_flat = torch.where(ring_pos >= 0, ring_page_ids * ps + r % ps, torch.zeros_like(ring_page_ids))
    if kept_max is None:
        kept_max = int(kept_len.max()) if kept_len.numel() else 0
    kmax = kept_max
    kk = torch.arange(kmax, device=dev)
    kept_valid = kk[None, None, :] < kept_len[..., None]
    kept_pages = torch.gather(table, -1, (ring_pages + kk // ps).expand(b, h, kmax))
    kept_flat = torch.where(kept_valid, kept_pages * ps + kk % ps, torch.zeros_like(kept_pages))
    flat = torch.cat([ring_flat, kept_flat], -1)
    pos = torch.cat([ring_pos, torch.where(kept_valid, -2, -1).expand(b, h, kmax).to(ring_pos.dtype)], -1)
    return k_pool.view(-1, d)[flat], v_pool.view(-1, d)[flat], pos


def torch_paged_attention(
    q: torch.Tensor,  # [B, Hq, T, D] new queries at positions starts + a
    k_new: torch.Tensor,  # [B, H, T, D]
    v_new: torch.Tensor,
    new_evict: torch.Tensor,  # [B, H, T] bool, decisions of the new keys
    n_new: torch.Tensor,  # [B] valid new tokens per row
    starts: torch.Tensor,  # [B]
    k_pool: torch.Tensor,  # [P, ps, D]
    v_pool: torch.Tensor,
    table: torch.Tensor,  # [B, H, R + K]
    kept_len: torch.Tensor,  # [B, H]
    ring_evict: torch.Tensor,  # [B, H, w]
    window: int,
    ring_pages: int,
    scale: float | None = None,
    kept_max: int | None = None,  # a host bound on kept_len (None: read it, one sync)
) -> torch.Tensor:
    b, hq, t, d = q.shape
    h = k_new.shape[1]
    g = hq // h
    w = window
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dev = q.device
    kc, vc, pos = gather_lists(k_pool, v_pool, table, kept_len, starts, w, ring_pages, kept_max)
    kmax = pos.shape[-1] - w
    evict_c = torch.cat([ring_evict, torch.zeros((b, h, kmax), dtype=torch.bool, device=dev)], -1)

    a = torch.arange(t, device=dev)
    qpos = starts[:, None] + a[None, :]  # [B, T]
    dist_c = qpos[:, None, :, None] - pos[:, :, None, :]  # [B, H, T, C]
    vis_c = (pos[:, :, None, :] == -2) | ((pos[:, :, None, :] >= 0) & ((dist_c <= w) | ~evict_c[:, :, None, :]))
    dist_n = a[:, None] - a[None, :]  # [T, T]
    valid_k = (a[None, :] < n_new[:, None])[:, None, None, :]  # [B, 1, 1, T]
    vis_n = (dist_n >= 0)[None, None] & valid_k & ((dist_n <= w)[None, None] | ~new_evict[:, :, None, :])
    vis = torch.cat([vis_c, vis_n], -1)  # [B, H, T, C + T]

    keys = torch.cat([kc, k_new], 2)
    vals = torch.cat([vc, v_new], 2)
    # Keys nobody sees (padding, evicted) may hold stale pool data: never let it reach 0 * x.
    vals = vals.masked_fill(~vis.any(-2)[..., None], 0.0)
    out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=vis.repeat_interleave(g, 1), scale=scale,
                                         enable_gqa=g > 1)
    # a query row with no visible key (only padding rows can have none) returns zeros, not NaN
    return torch.where(vis.any(-1).repeat_interleave(g, 1)[..., None], out, torch.zeros((), dtype=out.dtype))
