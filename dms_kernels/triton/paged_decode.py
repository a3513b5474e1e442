"""Paged split-K decode attention over per-(sequence, KV head) lists of different lengths.

Layout (docs/ARCHITECTURE.md, "Cache layout: the paged runtime"): list ``l`` holds ``n_ring[b]``
ring tokens (ring slot ``i`` for ``i < n_ring``, page ``table[l, i // PS]``) and ``kept[l]`` kept
tokens (kept token ``j`` in page ``table[l, R + j // PS]``). In decode every held token is
visible to the new query (ring tokens are all within the window), so the kernel reads exactly
the held tokens, with no mask other than the list length; the new token's own key is merged by
log-sum-exp afterwards.

Grid: (lists, splits). Program (l, s) reads logical tokens ``[s * split, (s + 1) * split)`` of
list ``l`` for the ``G`` query heads of its GQA group at once, and writes a partial
(max, sum, accumulator). A split past the end of its list writes max = -inf, sum = 0: the merge
gives it weight 0 (never exp(0) = 1 for an empty part).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def paged_decode_split_kernel(
    Q,  # [B, Hq, D]
    KPool,  # [P, PS, D]
    VPool,
    Table,  # [NLB, TW] int64 page ids of the lists of this step (list index = b * H + h)
    NRing,  # [B] int64 ring tokens held (min(start, w))
    Kept,  # [NLB] int64 kept tokens held
    Acc,  # [NLB, S, G, D] float32
    M,  # [NLB, S, G] float32
    Lsum,  # [NLB, S, G] float32
    scale,
    H,
    G,
    R,
    split,
    stride_qb, stride_qh,
    stride_pp, stride_po,
    stride_t,
    stride_al, stride_as, stride_ag,
    stride_ml, stride_ms,
    PS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    DOT_FP32: tl.constexpr,  # fp32 operands in tl.dot: fp32 caches, and the CPU interpreter (bf16 dots are wrong there)
    PRECISION: tl.constexpr,  # "ieee" in the interpreter, "tf32x3" (about fp32 accuracy on tensor cores) on GPU
):
    lst = tl.program_id(0)
    sp = tl.program_id(1)
    b = lst // H
    h = lst % H
    n_ring = tl.load(NRing + b)
    n_tot = n_ring + tl.load(Kept + lst)
    start = sp * split
    end = tl.minimum(start + split, n_tot)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    g_ok = g < G
    q = tl.load(Q + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
    qf = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    # A while loop: the trip count depends on the loaded length, and the interpreter (numpy 2)
    # cannot turn such a value into a Python range bound.
    i0 = start
    while i0 < end:
        idx = i0 + tl.arange(0, BLOCK_N)
        ok = idx < end
        in_ring = idx < n_ring
        j = idx - n_ring
        col = tl.where(in_ring, idx // PS, R + j // PS)
        off = tl.where(in_ring, idx % PS, j % PS)
        page = tl.load(Table + lst * stride_t + col, mask=ok, other=0)
        base = page * stride_pp + off * stride_po
        k = tl.load(KPool + base[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(VPool + base[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        if DOT_FP32:
            s = tl.dot(qf, tl.trans(k.to(tl.float32)), input_precision=PRECISION)
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(ok[None, :], s * scale, float("-inf"))  # [BLOCK_G, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: the block holds a valid token
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_FP32:
            pv = tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
        i0 += BLOCK_N

    out = lst * stride_al + sp * stride_as + g[:, None] * stride_ag + d[None, :]
    tl.store(Acc + out, acc, mask=g_ok[:, None])
    tl.store(M + lst * stride_ml + sp * stride_ms + g, m_i, mask=g_ok)
    tl.store(Lsum + lst * stride_ml + sp * stride_ms + g, l_i, mask=g_ok)
