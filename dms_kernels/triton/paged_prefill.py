"""DMS chunk (prefill) attention over the paged cache plus the new chunk, FlashAttention style.

Queries of one chunk (positions ``start + a``, ``a < n``) of one sequence attend to three key
segments, merged by one online softmax:

1. the **ring** (``w`` slots): slot ``r`` holds position ``p = start-1-((start-1-r) mod w)`` if
   ``p >= 0``; visible to query ``i`` iff ``i - p <= w`` or its decision is keep;
2. the **kept store** (``kept`` tokens): always visible;
3. the **new chunk** keys ``a' <= a``: visible iff ``a - a' <= w`` or the key is kept.

The ``G`` query heads of a GQA group are packed into the rows of one tile (``BLOCK_G * BLOCK_M``
rows: row ``r`` is head ``r // BLOCK_M``, query ``r % BLOCK_M``), so each K/V tile is loaded once
per group. Key blocks of the new chunk past the last query of the tile are skipped (causal), and
so are blocks that every query of the tile sees only through evicted keys beyond the window.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _online_update(m_i, l_i, acc, s, v, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # rows with no visible key so far keep m = -inf; use 0 as their reference to avoid inf - inf
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_ref)
    p = tl.exp(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DOT_FP32:
        pv = tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _scores(q, qf, k, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    if DOT_FP32:
        return tl.dot(qf, tl.trans(k.to(tl.float32)), input_precision=PRECISION)
    return tl.dot(q, tl.trans(k))


@triton.jit
def paged_prefill_kernel(
    Q,  # [B, Hq, T, D]
    KNew,  # [B, H, T, D]
    VNew,
    NewEvict,  # [B, H, T] int8 decisions of the new keys
    KPool,  # [P, PS, D]
    VPool,
    Table,  # [B*H, TW] int64
    RingEvict,  # [B*H, W] int8
    Kept,  # [B*H] int64
    Starts,  # [B] int64
    NNew,  # [B] int64
    Out,  # [B, Hq, T, D]
    scale,
    H,
    G,
    R,
    W,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_eb, stride_eh,
    stride_pp, stride_po,
    stride_t, stride_rw,
    stride_ob, stride_oh, stride_ot,
    PS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" in the interpreter, "tf32x3" (about fp32 accuracy on tensor cores) on GPU
):
    lst = tl.program_id(0)
    mb = tl.program_id(1)
    b = lst // H
    h = lst % H
    start = tl.load(Starts + b)
    n = tl.load(NNew + b)
    kept = tl.load(Kept + lst)

    rows = tl.arange(0, BLOCK_G * BLOCK_M)
    gi = rows // BLOCK_M
    ai = mb * BLOCK_M + rows % BLOCK_M  # query index inside the chunk
    row_ok = (gi < G) & (ai < n)
    qpos = start + ai
    d = tl.arange(0, D)
    q_ptr = Q + b * stride_qb + (h * G + gi)[:, None] * stride_qh + ai[:, None] * stride_qt + d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None], other=0.0)
    qf = q.to(tl.float32)

    m_i = tl.full([BLOCK_G * BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G * BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_G * BLOCK_M, D], tl.float32)

    # 1. the ring: w slots, window rule
    r0 = 0
    while r0 < W:
        r = r0 + tl.arange(0, BLOCK_N)
        last = start - 1
        pos = last - ((last - r) % W + W) % W
        ok = (r < W) & (pos >= 0)
        page = tl.load(Table + lst * stride_t + r // PS, mask=ok, other=0)
        base = page * stride_pp + (r % PS) * stride_po
        k = tl.load(KPool + base[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(VPool + base[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        ev = tl.load(RingEvict + lst * stride_rw + r, mask=ok, other=0) != 0
        vis = ok[None, :] & (((qpos[:, None] - pos[None, :]) <= W) | ~ev[None, :])
        s = tl.where(vis, _scores(q, qf, k, DOT_FP32, PRECISION) * scale, float("-inf"))
        m_i, l_i, acc = _online_update(m_i, l_i, acc, s, v, DOT_FP32, PRECISION)
        r0 += BLOCK_N

    # 2. the kept store: always visible
    j0 = 0
    while j0 < kept:
        j = j0 + tl.arange(0, BLOCK_N)
        ok = j < kept
        page = tl.load(Table + lst * stride_t + R + j // PS, mask=ok, other=0)
        base = page * stride_pp + (j % PS) * stride_po
        k = tl.load(KPool + base[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(VPool + base[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        s = tl.where(ok[None, :], _scores(q, qf, k, DOT_FP32, PRECISION) * scale, float("-inf"))
        m_i, l_i, acc = _online_update(m_i, l_i, acc, s, v, DOT_FP32, PRECISION)
        j0 += BLOCK_N

    # 3. the new chunk: causal + window rule; stop after the tile's last query
    hi = tl.minimum(n, (mb + 1) * BLOCK_M)
    c0 = 0
    while c0 < hi:
        c = c0 + tl.arange(0, BLOCK_N)
        ok = c < n
        kv_off = b * stride_kb + h * stride_kh + c[:, None] * stride_kt + d[None, :]
        ev = tl.load(NewEvict + b * stride_eb + h * stride_eh + c, mask=ok, other=0) != 0
        # skip a block whose keys are all evicted and beyond the window of every query of the tile
        far = (mb * BLOCK_M - (c0 + BLOCK_N - 1)) > W
        if (tl.sum((ok & ~ev).to(tl.int32), axis=0) > 0) | ~far:
            k = tl.load(KNew + kv_off, mask=ok[:, None], other=0.0)
            v = tl.load(VNew + kv_off, mask=ok[:, None], other=0.0)
            dist = ai[:, None] - c[None, :]
            vis = ok[None, :] & (dist >= 0) & ((dist <= W) | ~ev[None, :])
            s = tl.where(vis, _scores(q, qf, k, DOT_FP32, PRECISION) * scale, float("-inf"))
            m_i, l_i, acc = _online_update(m_i, l_i, acc, s, v, DOT_FP32, PRECISION)
        c0 += BLOCK_N

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # a row with no visible key (padding) returns zeros
    out = acc / l_safe[:, None]
    o_ptr = Out + b * stride_ob + (h * G + gi)[:, None] * stride_oh + ai[:, None] * stride_ot + d[None, :]
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
