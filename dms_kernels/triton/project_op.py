"""Wrapper of the fused projection epilogue (q/k norm, eviction logit, zeroing, RoPE, previous
key's decision, the attention sinks) for the new tokens of one layer."""

from __future__ import annotations

import torch

from .project import project_kernel


def fused_project(q_raw, k_raw, cos, sin, *, num_kv_heads: int, q_norm_weight=None, k_norm_weight=None,
                  eps: float = 1e-6, variant: str | None = "borrowed", adapter_logits=None, scale: float = 100.0,
                  offset: float = 5.0, ring_evict=None, lists=None, starts=None, n_new=None, sink_tokens: int = 0):
    """q_raw ``[B, T, Hq*D]``, k_raw ``[B, T, H*D]`` (the projections' outputs); cos/sin
    ``[B, 1, T, D]`` or ``[B, T, D]``. variant: "borrowed" (logits from q), "adapter" (logits given in
    ``adapter_logits`` ``[B, H, T]``) or None (eviction off). ``ring_evict`` ``[NL, w]`` (bool),
    ``lists`` ``[B, H]``, ``starts``/``n_new`` ``[B]``: where the previous key's decision goes
    (``starts``: also the position of each sequence's first new token). ``sink_tokens = n``: the
    logits at positions ``1 .. n`` are :data:`~dms_kernels.reference.SINK_LOGIT` (keys ``0 .. n-1`` kept,
    ``reference.keep_sinks``), in the output and in the recorded decision.
    Returns q ``[B, Hq, T, D]``, k ``[B, H, T, D]``, logits ``[B, H, T]`` float32 (None when off);
    rows past ``n_new`` are zeros.
    """
    if q_raw.dim() != 3 or k_raw.dim() != 3 or q_raw.shape[:2] != k_raw.shape[:2]:
        raise ValueError(f"q_raw/k_raw: expected [B, T, Hq*D] and [B, T, H*D], got {tuple(q_raw.shape)}, {tuple(k_raw.shape)}")
    b, t, _ = q_raw.shape
    h = num_kv_heads
    if k_raw.shape[2] % h:
        raise ValueError(f"num_kv_heads: {h} does not divide k_raw's last dim {k_raw.shape[2]}")
    d = k_raw.shape[2] // h
    if q_raw.shape[2] % d or (q_raw.shape[2] // d) % h:
        raise ValueError(f"q_raw: last dim {q_raw.shape[2]} is not a multiple of H*D = {h * d}")
    if d & (d - 1):
        raise ValueError(f"head dim {d} must be a power of two")
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or not 0 <= sink_tokens < 2**31:
        raise ValueError(f"sink_tokens: expected an int in [0, 2**31), got {sink_tokens!r}")
    if variant not in ("borrowed", "adapter", None):
        raise ValueError(f"variant: expected 'borrowed', 'adapter' or None, got {variant!r}")
    hq = q_raw.shape[2] // d
    dev = q_raw.device
    cos = cos.reshape(b, t, d).float().contiguous()
    sin = sin.reshape(b, t, d).float().contiguous()
    n_new = torch.full((b,), t, dtype=torch.int64, device=dev) if n_new is None else n_new
    starts = torch.zeros(b, dtype=torch.int64, device=dev) if starts is None else starts
    if ring_evict is None:
        ring_evict = torch.zeros((1, 1), dtype=torch.bool, device=dev)
        lists = torch.zeros((b, h), dtype=torch.int64, device=dev)  # no cache: decisions go to a dummy slot
    if variant == "adapter" and (adapter_logits is None or tuple(adapter_logits.shape) != (b, h, t)):
        raise ValueError(f"adapter_logits: expected float32 [{b}, {h}, {t}] for the adapter variant")
    q_out = torch.zeros((b, hq, t, d), dtype=q_raw.dtype, device=dev)
    k_out = torch.zeros((b, h, t, d), dtype=k_raw.dtype, device=dev)
    logits = torch.zeros((b, h, t), dtype=torch.float32, device=dev)
    qk_norm = q_norm_weight is not None
    dummy = torch.zeros(1, device=dev)
    ring8 = ring_evict.view(torch.int8)
    if b * t:
        project_kernel[(b * t, hq + h)](
            q_raw.contiguous(), k_raw.contiguous(), q_norm_weight if qk_norm else dummy,
            k_norm_weight if qk_norm else dummy, cos, sin,
            adapter_logits.float().contiguous() if variant == "adapter" else dummy,
            q_out, k_out, logits, ring8, lists.contiguous(), starts.contiguous(), n_new.contiguous(),
            t, hq, h, hq // h, ring_evict.shape[1], eps, scale, offset, sink_tokens, ring8.stride(0),
            D=d, QK_NORM=qk_norm, BORROWED=variant == "borrowed", ADAPTER=variant == "adapter",
        )
    return q_out, k_out, (logits if variant is not None else None)
