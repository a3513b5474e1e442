"""A warm start for the adapter: each layer's eviction logits fitted locally, without backpropagation
through the network, then calibrated to the CR target.

One forward pass of the frozen base (eviction off) over a few sequences gives, per layer:

* the residual stream ``h_pre`` the adapter reads, and
* for each key ``j`` and KV head, how much attention it receives from the queries that would no
  longer see it if it were evicted: the queries ``i > j + w`` (semantics §3). The statistic is the
  mean over those queries of ``p[i, j] * (i + 1)`` (attention relative to uniform, so early and late
  queries weigh alike), the largest over the query heads of the group.

Keys with at least ``min_far`` such queries are labelled: per layer, the ``1 - 1/CR`` fraction with
the least far attention are "evict", the rest "keep". The adapter logit for key ``j`` is computed at
position ``j + 1`` (the shift of §2), so the features are ``h_pre[j + 1]``. Each layer's
``dms_proj_alpha`` is fitted by logistic regression in the adapter's own form
(``scale * W RMSNorm(h) - offset``, the norm weight left at one; each "keep" key weighed by its far
attention, so that the few keys whose eviction would cost most, such as the attention sink, weigh
most), then shifted so that the layer marks the target fraction of its positions (``logit > 0``).
The adapter has no bias (or one that stays at zero) to move the fixed ``-offset``: the fit and the
calibration move it through the near-constant directions a normalised residual stream has (the
calibration shifts the weights along the features' mean).

The result is a starting point for distillation (``dms retrofit --warm-start``), whose
compression anneal may then start at the target CR.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .. import validation as V
from ..models.decoder import DecoderLM
from .training_backend import eviction_off


@dataclass(slots=True)
class WarmStartReport:
    layers: int
    samples_per_layer: int  # labelled keys per layer (all KV heads)
    target_fraction: float
    marked_fraction: list[float]  # per layer, over every position of the fitting sequences
    label_agreement: list[float]  # per layer: fitted decision == label, over the labelled keys

    def to_dict(self) -> dict:
        return asdict(self)


class _FarAttention:
    """Dense causal attention that also measures, per layer, KV head and key, the attention the key
    gets from queries more than ``window`` positions later (see the module docstring)."""

    def __init__(self, window: int):
        self.window = window
        self.far: dict[int, torch.Tensor] = {}  # layer -> [B, Hkv, T] (0 for a key with no far query)
        self.counts: torch.Tensor | None = None  # [T] far queries per key

    def attend(self, layer, q, k, v, logits):
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        kk = k.repeat_interleave(g, dim=1).float()
        vv = v.repeat_interleave(g, dim=1)
        scores = q.float() @ kk.transpose(-1, -2) / math.sqrt(d)  # [B, Hq, T, T]
        i = torch.arange(t, device=q.device)
        scores = scores.masked_fill(i[None, :] > i[:, None], float("-inf"))
        p = scores.softmax(-1)
        far = (i[:, None] - i[None, :]) > self.window  # [query, key]
        rel = p * (i + 1).to(p.dtype)[:, None]  # relative to a uniform spread over the i + 1 keys
        count = far.sum(0)  # [T] far queries per key
        mean = (rel * far).sum(-2) / count.clamp(min=1)  # [B, Hq, T]
        self.far[layer] = mean.view(b, hkv, g, t).amax(2)
        self.counts = count
        return (p.to(vv.dtype) @ vv).to(q.dtype)


_MAX_IMPORTANCE = 100.0  # a key weighs at most this many average "keep" keys in the fit


@torch.no_grad()
def collect(model: DecoderLM, sequences: torch.Tensor, window: int):
    """Per layer: the adapter's normalised inputs ``[N, T, H]`` and the far-attention statistic
    ``[N, Hkv, T]``; and the far-query count per key ``[T]``."""
    feats: dict[int, list[torch.Tensor]] = {}
    far: dict[int, list[torch.Tensor]] = {}
    counts = None
    hooks = []
    for layer, block in enumerate(model.model.layers):
        attn = block.self_attn
        eps = attn.dms_proj_alpha_norm.eps

        def grab(module, args, layer=layer, eps=eps):
            h = args[1].float()  # the adapter's input, normalised without its norm weight
            feats.setdefault(layer, []).append(F.rms_norm(h, (h.shape[-1],), eps=eps))

        hooks.append(attn.register_forward_pre_hook(grab))
    try:
        with eviction_off(model):
            for row in sequences:
                backend = _FarAttention(window)
                ids = row[None].to(model.device)
                pos = torch.arange(ids.shape[1], device=model.device)[None]
                model(ids, pos, backend)
                for layer, f in backend.far.items():
                    far.setdefault(layer, []).append(f.cpu())
                counts = backend.counts.cpu()
    finally:
        for h in hooks:
            h.remove()
    return ({k: torch.cat(v) for k, v in feats.items()}, {k: torch.cat(v) for k, v in far.items()}, counts)


def _fit_layer(x: torch.Tensor, y: torch.Tensor, offset: float, iters: int,
               importance: torch.Tensor | None = None) -> torch.Tensor:
    """Logistic regression ``sigmoid(x @ u - offset)`` -> labels ``y`` ``[N, Hkv]``, one ``u`` per
    KV head (``u = scale * W``); classes weighed equally, and within the "keep" class each key by
    ``importance`` ``[N, Hkv]`` when given (what evicting it would cost: its far attention)."""
    n, h = x.shape
    hkv = y.shape[1]
    u = torch.zeros(hkv, h, requires_grad=True)
    pos = y.float().mean(0).clamp(1e-3, 1 - 1e-3)
    keep_weight = torch.ones_like(y, dtype=torch.float32)
    if importance is not None:
        imp = importance.float().clamp(min=0)
        mean_keep = (imp * ~y).sum(0) / (~y).sum(0).clamp(min=1)
        keep_weight = (imp / mean_keep.clamp(min=1e-12)).clamp(max=_MAX_IMPORTANCE)
        keep_weight = keep_weight / ((keep_weight * ~y).sum(0) / (~y).sum(0).clamp(min=1)).clamp(min=1e-12)
    weight = torch.where(y, 0.5 / pos, 0.5 / (1 - pos) * keep_weight)
    opt = torch.optim.Adam([u], lr=0.05)
    for _ in range(iters):
        opt.zero_grad()
        z = x @ u.T - offset
        loss = F.binary_cross_entropy_with_logits(z, y.float(), weight=weight)
        loss.backward()
        opt.step()
    return u.detach()


def _calibrate(x: torch.Tensor, u: torch.Tensor, offset: float, target: float) -> torch.Tensor:
    """``u`` shifted along the features' mean direction so that a fraction ``target`` of the logits
    ``x @ u.T - offset`` (all rows and KV heads) is above zero: the shift adds about the same to every
    logit of the layer (``x @ d`` is one on average), keeping the fit's order of the keys."""
    d = x.mean(0)
    d = d / d.dot(d).clamp(min=1e-12)
    s, proj = x @ u.T, (x @ d)[:, None]
    lo, hi = -1e4, 1e4
    for _ in range(100):
        mid = (lo + hi) / 2
        if ((s + mid * proj) > offset).float().mean().item() < target:
            lo = mid
        else:
            hi = mid
    return u + hi * d[None, :]


def warm_start(model: DecoderLM, sequences: torch.Tensor, cr: float, window: int | None = None,
               min_far: int = 32, iters: int = 200, weighted: bool = True) -> WarmStartReport:
    """Fit every layer's ``dms_proj_alpha`` from ``sequences`` ``[N, T]`` (token ids, no padding) as
    the module docstring says, in place, and report what the fit reached."""
    dms = model.config.dms
    if dms is None or not dms.separate_alpha:
        raise ValueError("model: the warm start fits the adapter; load it with dms_separate_alpha=True")
    cr = V.number("cr", cr, 1)
    window = dms.window_size if window is None else V.integer("window", window, 1, V.MAX_WINDOW)
    min_far = V.integer("min_far", min_far, 1)
    iters = V.integer("iters", iters, 1)
    if not torch.is_tensor(sequences) or sequences.dim() != 2 or sequences.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sequences: expected an integer tensor [N, T], got {getattr(sequences, 'shape', sequences)!r}")
    t = sequences.shape[1]
    if t < window + 1 + min_far + 1:
        raise ValueError(f"sequences: {t} tokens leave no key with {min_far} queries beyond window {window}; "
                         f"expected at least {window + min_far + 2} tokens")
    target = 1.0 - 1.0 / cr
    feats, far, counts = collect(model, sequences, window)
    labelled = counts[: t - 1] >= min_far  # key j needs h_pre[j + 1]
    marked, agreement = [], []
    for layer, block in enumerate(model.model.layers):
        attn = block.self_attn
        x_all = feats[layer][:, 1:]  # [N, T-1, H]: position j + 1 decides key j
        stat = far[layer][:, :, : t - 1]  # [N, Hkv, T-1]
        x = x_all[:, labelled].reshape(-1, x_all.shape[-1])
        s = stat[:, :, labelled].permute(0, 2, 1).reshape(-1, stat.shape[1])  # [M, Hkv]
        cut = torch.quantile(s.flatten().double(), target).item() if target > 0 else -math.inf
        y = s <= cut if target > 0 else torch.zeros_like(s, dtype=torch.bool)
        if target > 0:
            u = _fit_layer(x, y, dms.initial_alpha_offset, iters, importance=s if weighted else None)
            u = _calibrate(x_all.reshape(-1, x_all.shape[-1]), u, dms.initial_alpha_offset, target)
        else:
            u = torch.zeros(stat.shape[1], x.shape[1])
        w = attn.dms_proj_alpha.weight
        w.data.copy_((u / dms.alpha_scale).to(w.dtype))
        attn.dms_proj_alpha_norm.weight.data.fill_(1.0)
        if attn.dms_proj_alpha.bias is not None:
            attn.dms_proj_alpha.bias.data.zero_()
        z_all = x_all.reshape(-1, x_all.shape[-1]) @ u.T - dms.initial_alpha_offset
        marked.append((z_all > 0).float().mean().item())
        agreement.append(((x @ u.T - dms.initial_alpha_offset > 0) == y).float().mean().item())
    return WarmStartReport(len(model.model.layers), y.numel(), target, marked, agreement)
