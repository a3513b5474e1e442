"""Fused projection epilogue of a DMS attention layer, one launch for all sequences and heads.

From the raw q/k projections of the new tokens: the per-head q/k RMSNorm (Qwen3), the eviction
logit (borrowed channel ``D-1`` of the first query head of each group, in float32, scaled and
offset) or the adapter's logit given as input, zeroing of that channel before and after RoPE,
RoPE on q and k, the attention sinks (with ``sinks = n``, the logits at positions ``1 .. n``, which
decide keys ``0 .. n-1``, are set to ``SINK_LOGIT``: keep, as ``reference.keep_sinks``), and the
decision of the previous key (``logit at the chunk's first position > 0``, after the sinks) written
into the cache's ring. Grid: (B * T, Hq + Hkv); a program handles one head row.

The new k/v are *not* written here: the key ``w`` positions back must stay visible to the new
query, and it lives in the ring slot the new key will take. The store kernel runs after attention.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..reference import SINK_LOGIT

_SINK_LOGIT = tl.constexpr(SINK_LOGIT)


@triton.jit
def project_kernel(
    QRaw,  # [B, T, Hq * D]
    KRaw,  # [B, T, H * D]
    QNormW,  # [D] (read when QK_NORM)
    KNormW,
    Cos,  # [B, T, D] float32
    Sin,
    AdapterLogits,  # [B, H, T] float32 (read when not BORROWED)
    QOut,  # [B, Hq, T, D]
    KOut,  # [B, H, T, D]
    Logits,  # [B, H, T] float32
    RingEvict,  # [NL, W] int8 (the cache's bool tensor)
    Lists,  # [B, H] int64 list ids of this layer
    Starts,  # [B] int64
    NNew,  # [B] int64
    T,
    HQ,
    H,
    G,
    W,
    eps,
    scale,
    offset,
    sinks,  # dms_sink_tokens: the first ``sinks`` keys are kept
    stride_rw,
    D: tl.constexpr,
    QK_NORM: tl.constexpr,
    BORROWED: tl.constexpr,  # borrowed-neuron logits (computed here)
    ADAPTER: tl.constexpr,  # adapter logits (given in AdapterLogits); neither: eviction off
):
    bt = tl.program_id(0)
    head = tl.program_id(1)
    b = bt // T
    t = bt % T
    n = tl.load(NNew + b)
    if t < n:
        d = tl.arange(0, D)
        half = D // 2
        rot = (d + half) % D  # rotate_half partner
        sign = tl.where(d < half, -1.0, 1.0)
        c = tl.load(Cos + bt * D + d)
        s = tl.load(Sin + bt * D + d)
        is_q = head < HQ
        if is_q:
            src = QRaw + bt * HQ * D + head * D
            w_ptr = QNormW
        else:
            src = KRaw + bt * H * D + (head - HQ) * D
            w_ptr = KNormW
        x = tl.load(src + d).to(tl.float32)
        xr = tl.load(src + rot).to(tl.float32)
        if QK_NORM:
            inv = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
            # the norm output is rounded to the model dtype before RoPE, like the torch path
            x = (tl.load(w_ptr + d).to(tl.float32) * (x * inv).to(QOut.dtype.element_ty).to(tl.float32))
            xr = (tl.load(w_ptr + rot).to(tl.float32) * (xr * inv).to(QOut.dtype.element_ty).to(tl.float32))
        x = x.to(QOut.dtype.element_ty).to(tl.float32)
        xr = xr.to(QOut.dtype.element_ty).to(tl.float32)
        if is_q:
            kv = head // G
            first = (head % G) == 0
            if BORROWED and first:
                logit = tl.sum(tl.where(d == D - 1, x, 0.0), axis=0) * scale - offset  # float32
                logit = _keep_sink(logit, Starts, b, t, sinks)
                tl.store(Logits + (b * H + kv) * T + t, logit)
                if t == 0:
                    _record_previous(RingEvict, Lists, Starts, b, kv, H, W, stride_rw, logit)
                x = tl.where(d == D - 1, 0.0, x)  # zeroed before RoPE ...
                xr = tl.where(rot == D - 1, 0.0, xr)
            y = x * c + sign * xr * s
            if BORROWED and first:
                y = tl.where(d == D - 1, 0.0, y)  # ... and after (RoPE mixes D-1 into D/2-1)
            tl.store(QOut + ((b * HQ + head) * T + t) * D + d, y.to(QOut.dtype.element_ty))
        else:
            kh = head - HQ
            y = x * c + sign * xr * s
            tl.store(KOut + ((b * H + kh) * T + t) * D + d, y.to(KOut.dtype.element_ty))
            if ADAPTER:
                logit = _keep_sink(tl.load(AdapterLogits + (b * H + kh) * T + t), Starts, b, t, sinks)
                tl.store(Logits + (b * H + kh) * T + t, logit)
                if t == 0:
                    _record_previous(RingEvict, Lists, Starts, b, kh, H, W, stride_rw, logit)


@triton.jit
def _keep_sink(logit, Starts, b, t, sinks):
    """The logit at position ``start + t``, or ``SINK_LOGIT`` where that position decides a sink key."""
    pos = tl.load(Starts + b) + t
    return tl.where((pos >= 1) & (pos <= sinks), _SINK_LOGIT, logit)


@triton.jit
def _record_previous(RingEvict, Lists, Starts, b, kv, H, W, stride_rw, logit):
    """The chunk's first logit decides the key at ``start - 1`` (in ring slot ``(start-1) % W``)."""
    start = tl.load(Starts + b)
    if start >= 1:
        lst = tl.load(Lists + b * H + kv)
        tl.store(RingEvict + lst * stride_rw + (start - 1) % W, (logit > 0).to(tl.int8))
