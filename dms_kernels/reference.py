"""The executable definition of Dynamic Memory Sparsification (DMS) in plain PyTorch.

Every kernel and every runtime path of the project is tested against these
functions. They favour clarity over speed: scores are computed in float32 (or
float64 when given float64), masks are materialised, nothing is fused.

Notation: batch ``B``, query heads ``Hq``, KV heads ``Hkv``, group
``G = Hq // Hkv`` (query head ``h`` reads KV head ``h // G``), positions ``T``,
head dim ``D``, delay window ``w``.

Semantics, to the off-by-one:

* eviction logit of KV head ``k`` at position ``t``: ``scale * q[b, k*G, t, D-1] - offset``
  (borrowed neuron) or ``scale * Linear(RMSNorm(h_pre)) - offset`` (adapter);
* ``evict = logit > 0``; the decision for key ``j`` is the logit at position ``j + 1``
  (the last key's decision is not known yet and counts as keep);
* query ``i`` sees key ``j`` iff ``j <= i`` and (``i - j <= w`` or key ``j`` is not evicted).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "eviction_logits",
    "adapter_eviction_logits",
    "zero_borrowed_channel",
    "eviction_decisions",
    "SINK_LOGIT",
    "sink_mask",
    "keep_sinks",
    "visibility_mask",
    "dms_attention",
    "dms_attention_cached",
    "logistic_noise",
    "soft_decisions",
    "hard_decisions",
    "training_bias",
    "live_tokens",
    "compression_loss",
]


# ----------------------------------------------------------------------------- validation


def _check_tensor(name: str, x, ndim: int, layout: str, *, floating: bool | None = None, dtype=None):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got shape {tuple(x.shape)}")
    if floating is True and not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point dtype, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {x.dtype}")


def _check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def _check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int):
        raise ValueError(f"window: expected an int >= 1, got {window!r}")
    if window < 1:
        raise ValueError(f"window: expected an int >= 1, got {window}")
    return window


def _group_size(num_q_heads: int, num_kv_heads, arg: str = "num_kv_heads") -> int:
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
        raise ValueError(f"{arg}: expected an int >= 1, got {num_kv_heads!r}")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"{arg}: the number of query heads ({num_q_heads}) must be a multiple of it, got {num_kv_heads}"
        )
    return num_q_heads // num_kv_heads


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------- §1 logits


def eviction_logits(q: torch.Tensor, num_kv_heads: int, scale: float = 100.0, offset: float = 5.0) -> torch.Tensor:
    """Borrowed-neuron eviction logits.

    q: ``[B, Hq, T, D]``, after the per-head q-norm (where the architecture has one), before RoPE.
    Returns ``[B, Hkv, T]`` float32: ``scale * q[:, k*G, :, D-1] - offset``, computed in float32
    (in bf16 ``q*100-5`` can round to exactly 0 and flip a decision).
    """
    _check_tensor("q", q, 4, "[B, Hq, T, D]", floating=True)
    g = _group_size(q.shape[1], num_kv_heads)
    out_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q[:, ::g, :, -1].to(out_dtype) * scale - offset


def adapter_eviction_logits(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    scale: float = 100.0,
    offset: float = 5.0,
) -> torch.Tensor:
    """Adapter eviction logits: ``Linear_{H->Hkv}(RMSNorm_own(h_pre)) * scale - offset``.

    hidden: ``[B, T, H]``, the residual stream before the layer's input norm.
    norm_weight: ``[H]``; proj_weight: ``[Hkv, H]``; proj_bias: ``[Hkv]`` or None.
    Returns ``[B, Hkv, T]`` float32 (float64 for float64 inputs).
    """
    _check_tensor("hidden", hidden, 3, "[B, T, H]", floating=True)
    h = hidden.shape[-1]
    _check_tensor("norm_weight", norm_weight, 1, "[H]", floating=True)
    if norm_weight.shape[0] != h:
        raise ValueError(f"norm_weight: expected shape ({h},), got {tuple(norm_weight.shape)}")
    _check_tensor("proj_weight", proj_weight, 2, "[Hkv, H]", floating=True)
    if proj_weight.shape[1] != h:
        raise ValueError(f"proj_weight: expected shape (Hkv, {h}), got {tuple(proj_weight.shape)}")
    if proj_bias is not None:
        _check_tensor("proj_bias", proj_bias, 1, "[Hkv]", floating=True)
        if proj_bias.shape[0] != proj_weight.shape[0]:
            raise ValueError(f"proj_bias: expected shape ({proj_weight.shape[0]},), got {tuple(proj_bias.shape)}")
    _check_same_device(hidden=hidden, norm_weight=norm_weight, proj_weight=proj_weight, proj_bias=proj_bias)
    dt = _compute_dtype(hidden, proj_weight)
    # float32 even inside a bf16 autocast region (training): a bf16 logit near the offset moves in
    # steps of 1/32, and a decision is a sign test on it
    with torch.autocast(hidden.device.type, enabled=False):
        x = hidden.to(dt)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(dt)
        y = F.linear(x, proj_weight.to(dt), None if proj_bias is None else proj_bias.to(dt))  # [B, T, Hkv]
        return y.transpose(1, 2) * scale - offset


def zero_borrowed_channel(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """A copy of ``q`` ``[B, Hq, T, D]`` with channel ``D-1`` of heads ``0, G, 2G, ...`` set to 0."""
    _check_tensor("q", q, 4, "[B, Hq, T, D]", floating=True)
    g = _group_size(q.shape[1], num_kv_heads)
    out = q.clone()
    out[:, ::g, :, -1] = 0
    return out


# ----------------------------------------------------------------------------- §2 decisions


def eviction_decisions(logits: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, T]`` logits -> bool ``[B, Hkv, T]`` decisions, shifted by one.

    ``decision[..., j] = logits[..., j + 1] > 0``; the last key is kept (its decision is not known
    yet) and position 0's logit decides nothing.
    """
    _check_tensor("logits", logits, 3, "[B, Hkv, T]", floating=True)
    out = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    out[..., :-1] = logits[..., 1:] > 0
    return out


# ----------------------------------------------------------------------------- sinks (an extension)

# The logit written where a sink's decision is taken: far below 0 (keep), finite so that training's
# ``(logit + noise) / tau`` and ``logsigmoid(-z)`` stay exact (sigmoid 0, bias 0) with no inf arithmetic.
SINK_LOGIT = -1.0e4


def sink_mask(positions: torch.Tensor, sink_tokens: int) -> torch.Tensor:
    """``[B, T]`` absolute positions -> bool ``[B, T]``: the positions whose logit decides a sink.

    With ``sink_tokens = n`` the first ``n`` keys of every sequence (positions ``0 .. n-1``) are
    never evicted. By the shift of §2 key ``j`` is decided at position ``j + 1``, so the marked
    positions are ``1 .. n``. ``n = 0`` (the default of ``dms_sink_tokens``) marks nothing: plain DMS.
    """
    _check_tensor("positions", positions, 2, "[B, T]")
    if positions.is_floating_point() or positions.dtype == torch.bool:
        raise ValueError(f"positions: expected an integer dtype, got {positions.dtype}")
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ValueError(f"sink_tokens: expected an int >= 0, got {sink_tokens!r}")
    return (positions >= 1) & (positions <= sink_tokens)


def keep_sinks(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, T]`` logits with every KV head's logit set to :data:`SINK_LOGIT` (keep) where
    ``mask`` ``[B, T]`` (from :func:`sink_mask`) is set; a new tensor, ``logits`` is not changed."""
    _check_tensor("logits", logits, 3, "[B, Hkv, T]", floating=True)
    _check_tensor("mask", mask, 2, "[B, T]", dtype=torch.bool)
    if mask.shape != (logits.shape[0], logits.shape[2]):
        raise ValueError(f"mask: expected shape {(logits.shape[0], logits.shape[2])} (B, T of logits), "
                         f"got {tuple(mask.shape)}")
    _check_same_device(logits=logits, mask=mask)
    return logits.masked_fill(mask[:, None, :], SINK_LOGIT)


# ----------------------------------------------------------------------------- §3 visibility


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, decisions: torch.Tensor, window: int) -> torch.Tensor:
    """Core rule. q_pos ``[B, Tq]``, k_pos ``[Tk]``, decisions ``[B, Hkv, Tk]`` -> ``[B, Hkv, Tq, Tk]``."""
    dist = q_pos[:, None, :, None] - k_pos[None, None, None, :]  # [B, 1, Tq, Tk]
    causal = dist >= 0
    recent = dist <= window
    return causal & (recent | ~decisions[:, :, None, :])


def visibility_mask(decisions: torch.Tensor, window: int) -> torch.Tensor:
    """bool ``[B, Hkv, T]`` decisions -> bool ``[B, Hkv, T, T]`` (query, key) visibility.

    Query ``i`` sees key ``j`` iff ``j <= i`` and (``i - j <= window`` or not ``decisions[j]``).
    """
    _check_tensor("decisions", decisions, 3, "[B, Hkv, T]", dtype=torch.bool)
    window = _check_window(window)
    b, _, t = decisions.shape
    pos = torch.arange(t, device=decisions.device)
    return _visible(pos.expand(b, t), pos, decisions, window)


def _masked_attention(q, k, v, visible, scale):
    """q ``[B,Hq,Tq,D]``, k/v ``[B,Hkv,Tk,D]``, visible ``[B,Hkv,Tq,Tk]`` -> ``[B,Hq,Tq,D]``."""
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    dt = _compute_dtype(q, k, v)
    kx = k.to(dt).repeat_interleave(g, dim=1)
    vx = v.to(dt).repeat_interleave(g, dim=1)
    vis = visible.repeat_interleave(g, dim=1)
    scores = torch.matmul(q.to(dt), kx.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~vis, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A row with no visible key (possible in tests, or for padding) returns zeros, not NaN.
    probs = torch.where(vis.any(-1, keepdim=True), probs, torch.zeros((), dtype=dt, device=q.device))
    # Keys no query sees (evicted, past the length) must not leak NaN/inf garbage through 0 * x.
    vx = vx.masked_fill(~vis.any(-2)[..., None], 0.0)
    return torch.matmul(probs, vx).to(q.dtype)


def _check_qkv(q, k, v, decisions):
    _check_tensor("q", q, 4, "[B, Hq, T, D]", floating=True)
    _check_tensor("k", k, 4, "[B, Hkv, T, D]", floating=True)
    _check_tensor("v", v, 4, "[B, Hkv, T, D]", floating=True)
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"k: expected batch {q.shape[0]} and head dim {q.shape[3]} as in q, got shape {tuple(k.shape)}"
        )
    _group_size(q.shape[1], k.shape[1], arg="k")
    if decisions is not None:
        _check_tensor("decisions", decisions, 3, "[B, Hkv, T]", dtype=torch.bool)
        if decisions.shape != k.shape[:3]:
            raise ValueError(f"decisions: expected shape {tuple(k.shape[:3])}, got {tuple(decisions.shape)}")
    _check_same_device(q=q, k=k, v=v, decisions=decisions)


def dms_attention(q, k, v, decisions, window: int, scale: float | None = None) -> torch.Tensor:
    """Dense causal DMS attention with GQA.

    q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]``, decisions bool ``[B, Hkv, T]`` (already shifted,
    see :func:`eviction_decisions`). Returns ``[B, Hq, T, D]`` in q's dtype. ``scale=None`` means
    ``1/sqrt(D)``.
    """
    _check_qkv(q, k, v, decisions)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k: expected {q.shape[2]} positions as in q, got {k.shape[2]}")
    window = _check_window(window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _masked_attention(q, k, v, visibility_mask(decisions, window), scale)


def dms_attention_cached(
    q, k_cache, v_cache, decisions, window: int, q_positions, kv_lengths, scale: float | None = None
) -> torch.Tensor:
    """DMS attention of new queries over a dense cache in which slot ``j`` holds position ``j``.

    q ``[B, Hq, Tq, D]`` at absolute positions ``q_positions`` ``[B, Tq]`` (int);
    k_cache/v_cache ``[B, Hkv, S, D]``; decisions bool ``[B, Hkv, S]``; kv_lengths ``[B]`` (int):
    slots ``>= kv_lengths[b]`` are never visible. Same rule as :func:`dms_attention`.
    """
    _check_qkv(q, k_cache, v_cache, decisions)
    window = _check_window(window)
    b, _, tq, _ = q.shape
    s = k_cache.shape[2]
    _check_tensor("q_positions", q_positions, 2, "[B, Tq]")
    if tuple(q_positions.shape) != (b, tq) or q_positions.is_floating_point():
        raise ValueError(f"q_positions: expected an integer tensor of shape ({b}, {tq}), got {q_positions.dtype} {tuple(q_positions.shape)}")
    _check_tensor("kv_lengths", kv_lengths, 1, "[B]")
    if kv_lengths.shape[0] != b or kv_lengths.is_floating_point():
        raise ValueError(f"kv_lengths: expected an integer tensor of shape ({b},), got {kv_lengths.dtype} {tuple(kv_lengths.shape)}")
    if bool((kv_lengths < 0).any()) or bool((kv_lengths > s).any()):
        raise ValueError(f"kv_lengths: expected values in [0, {s}], got {kv_lengths.tolist()}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k_pos = torch.arange(s, device=q.device)
    vis = _visible(q_positions.to(q.device), k_pos, decisions, window)
    vis = vis & (k_pos[None, None, None, :] < kv_lengths.to(q.device)[:, None, None, None])
    return _masked_attention(q, k_cache, v_cache, vis, scale)


# ----------------------------------------------------------------------------- §4 training


def logistic_noise(shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Logistic noise: the difference of two Gumbel(0, 1) samples, i.e. ``log(u) - log(1 - u)``."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    u = u.clamp(tiny, 1.0 - torch.finfo(dtype).eps)
    return torch.log(u) - torch.log1p(-u)


def _check_logits_noise(logits, tau, noise):
    _check_tensor("logits", logits, 3, "[B, Hkv, T]", floating=True)
    _check_tensor("noise", noise, 3, "[B, Hkv, T]", floating=True)
    if noise.shape != logits.shape:
        raise ValueError(f"noise: expected shape {tuple(logits.shape)}, got {tuple(noise.shape)}")
    if not (isinstance(tau, (int, float)) and tau > 0):
        raise ValueError(f"tau: expected a positive number, got {tau!r}")
    _check_same_device(logits=logits, noise=noise)


def soft_decisions(logits, tau: float, noise) -> torch.Tensor:
    """Gumbel-sigmoid relaxation ``sigmoid((logits + noise) / tau)``, ``[B, Hkv, T]``."""
    _check_logits_noise(logits, tau, noise)
    return torch.sigmoid((logits + noise) / tau)


def hard_decisions(logits, tau: float, noise) -> torch.Tensor:
    """Straight-through hard decisions: forward ``alpha_soft > 0.5``, gradient of ``alpha_soft``."""
    soft = soft_decisions(logits, tau, noise)
    return (soft > 0.5).to(soft.dtype) - soft.detach() + soft


def training_bias(logits, window: int, tau: float, noise) -> torch.Tensor:
    """Additive attention-score bias used in training, float ``[B, Hkv, T, T]`` (query, key).

    ``0`` if ``0 <= i - j <= w``; ``logsigmoid(-z[j+1])`` if ``i - j > w``; ``-inf`` if ``j > i``,
    with ``z = (logits + noise) / tau``.
    """
    _check_logits_noise(logits, tau, noise)
    window = _check_window(window)
    t = logits.shape[-1]
    z = (logits + noise) / tau
    far = torch.zeros_like(z)
    far[..., :-1] = F.logsigmoid(-z[..., 1:])  # far[j] = log(1 - alpha_soft[j + 1])
    pos = torch.arange(t, device=logits.device)
    dist = pos[:, None] - pos[None, :]  # [T(query), T(key)]
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    ninf = torch.full((), float("-inf"), dtype=z.dtype, device=z.device)
    bias = torch.where(dist > window, far[:, :, None, :], zero)
    return torch.where(dist < 0, ninf, bias)


def compression_loss(hard: torch.Tensor, target: float) -> torch.Tensor:
    """``mean_b relu(target - frac_b)``; hard ``[L, B, Hkv, T]``, frac_b its mean over L, Hkv, T."""
    _check_tensor("hard", hard, 4, "[L, B, Hkv, T]", floating=True)
    if not (isinstance(target, (int, float)) and 0.0 <= target < 1.0):
        raise ValueError(f"target: expected a number in [0, 1), got {target!r}")
    frac = hard.mean(dim=(0, 2, 3))
    return torch.relu(target - frac).mean()


# ----------------------------------------------------------------------------- cache size


def live_tokens(decisions: torch.Tensor, window: int, t: int) -> torch.Tensor:
    """Minimum number of tokens a cache must hold after positions ``0..t`` were processed.

    decisions bool ``[B, Hkv, T]`` with ``T > t``; returns int64 ``[B, Hkv]``:
    ``#{ j <= t : (t + 1 - j <= w) or not evict[j] }`` with ``evict[t]`` counted as keep.
    ``t = -1`` (nothing processed) gives zeros.
    """
    _check_tensor("decisions", decisions, 3, "[B, Hkv, T]", dtype=torch.bool)
    window = _check_window(window)
    if isinstance(t, bool) or not isinstance(t, int) or t < -1 or t >= decisions.shape[-1]:
        raise ValueError(f"t: expected an int in [-1, {decisions.shape[-1] - 1}], got {t!r}")
    d = decisions[..., : t + 1].clone()
    if t >= 0:
        d[..., t] = False
    j = torch.arange(t + 1, device=decisions.device)
    keep = ((t + 1 - j) <= window) | ~d
    return keep.sum(-1, dtype=torch.int64)
