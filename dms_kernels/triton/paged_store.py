"""Store step of the paged DMS cache, one launch for all lists of a layer (after attention).

For list ``l`` (sequence ``b``, KV head ``h``) processing positions ``[s, s + n)`` with ring
size ``w``: tokens that leave the window (positions ``< s + n - w``) — the oldest ring tokens,
then the oldest new tokens — are appended to the kept store in position order if their decision
is *keep* (dropped otherwise); then the last ``min(n, w)`` new tokens are written into their ring
slots (``pos % w``) with their decisions. Pages are allocated beforehand by the cache's
bookkeeping (tensor ops); the kernel only moves data and decisions.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def paged_store_kernel(
    KNew,  # [B, H, T, D]
    VNew,
    NewEvict,  # [B, H, T] int8
    KPool,  # [P, PS, D]
    VPool,
    Table,  # [NL, TW] int64, the cache's page table (pages already allocated)
    RingEvict,  # [NL, W] int8 (the cache's bool tensor), updated in place
    Lists,  # [B*H] int64 list id of (b, h)
    Kept,  # [B*H] int64 kept tokens before this step
    Starts,  # [B] int64
    NNew,  # [B] int64
    H,
    R,
    W,
    stride_kb, stride_kh, stride_kt,
    stride_eb, stride_eh,
    stride_pp, stride_po,
    stride_t, stride_rw,
    PS: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    lst = tl.load(Lists + pid)
    s = tl.load(Starts + b)
    n = tl.load(NNew + b)
    end = s + n
    cut = end - W  # positions below leave the window
    dest = tl.load(Kept + pid)  # next kept index
    d = tl.arange(0, D)

    # 1. leaving ring tokens, oldest first: positions max(0, s - w) .. min(s, cut) - 1
    p0 = tl.maximum(s - W, 0)
    p_hi = tl.minimum(s, cut)
    while p0 < p_hi:
        pos = p0 + tl.arange(0, BLOCK)
        ok = pos < p_hi
        slot = pos % W
        ev = tl.load(RingEvict + lst * stride_rw + slot, mask=ok, other=1) != 0
        keep = ok & ~ev
        rank = tl.cumsum(keep.to(tl.int64), axis=0) - 1
        src_page = tl.load(Table + lst * stride_t + slot // PS, mask=keep, other=0)
        src = src_page * stride_pp + (slot % PS) * stride_po
        k = tl.load(KPool + src[:, None] + d[None, :], mask=keep[:, None], other=0.0)
        v = tl.load(VPool + src[:, None] + d[None, :], mask=keep[:, None], other=0.0)
        di = dest + rank
        dst_page = tl.load(Table + lst * stride_t + R + di // PS, mask=keep, other=0)
        dst = dst_page * stride_pp + (di % PS) * stride_po
        tl.store(KPool + dst[:, None] + d[None, :], k, mask=keep[:, None])
        tl.store(VPool + dst[:, None] + d[None, :], v, mask=keep[:, None])
        dest += tl.sum(keep.to(tl.int64), axis=0)
        p0 += BLOCK

    # 2. leaving new tokens: chunk indices 0 .. cut - s - 1
    a_hi = tl.minimum(n, cut - s)
    a0 = 0
    while a0 < a_hi:
        a = a0 + tl.arange(0, BLOCK)
        ok = a < a_hi
        ev = tl.load(NewEvict + b * stride_eb + h * stride_eh + a, mask=ok, other=1) != 0
        keep = ok & ~ev
        rank = tl.cumsum(keep.to(tl.int64), axis=0) - 1
        src = b * stride_kb + h * stride_kh + a * stride_kt
        k = tl.load(KNew + src[:, None] + d[None, :], mask=keep[:, None], other=0.0)
        v = tl.load(VNew + src[:, None] + d[None, :], mask=keep[:, None], other=0.0)
        di = dest + rank
        dst_page = tl.load(Table + lst * stride_t + R + di // PS, mask=keep, other=0)
        dst = dst_page * stride_pp + (di % PS) * stride_po
        tl.store(KPool + dst[:, None] + d[None, :], k.to(KPool.dtype.element_ty), mask=keep[:, None])
        tl.store(VPool + dst[:, None] + d[None, :], v.to(VPool.dtype.element_ty), mask=keep[:, None])
        dest += tl.sum(keep.to(tl.int64), axis=0)
        a0 += BLOCK

    # 3. the new tokens still inside the window go to their ring slots (after every thread has
    #    read the ring tokens they replace)
    tl.debug_barrier()
    a0 = tl.maximum(n - W, 0)
    while a0 < n:
        a = a0 + tl.arange(0, BLOCK)
        ok = a < n
        slot = (s + a) % W
        src = b * stride_kb + h * stride_kh + a * stride_kt
        k = tl.load(KNew + src[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(VNew + src[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        ev = tl.load(NewEvict + b * stride_eb + h * stride_eh + a, mask=ok, other=0)
        page = tl.load(Table + lst * stride_t + slot // PS, mask=ok, other=0)
        dst = page * stride_pp + (slot % PS) * stride_po
        tl.store(KPool + dst[:, None] + d[None, :], k.to(KPool.dtype.element_ty), mask=ok[:, None])
        tl.store(VPool + dst[:, None] + d[None, :], v.to(VPool.dtype.element_ty), mask=ok[:, None])
        tl.store(RingEvict + lst * stride_rw + slot, ev, mask=ok)
        a0 += BLOCK
