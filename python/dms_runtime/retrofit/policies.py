"""Heuristic KV-cache policies that DMS is compared against, at a matched budget of KV tokens.

Each policy gives, per layer and KV head, the keys every query position may read (a boolean
``[Hkv, T(query), T(key)]`` mask over one teacher-forced sequence), as the policy would leave the
cache when that query is decoded:

* ``streaming`` (StreamingLLM): ``sinks`` first tokens plus the most recent ``budget - sinks``.
* ``tova``: when the cache exceeds the budget, evict the token the current query attends to least
  (attention averaged over the query heads sharing the KV head).
* ``h2o``: half the budget for the most recent tokens, the other half for the "heavy hitters"
  with the largest attention accumulated over all queries so far.
* ``quest``: keeps every token (no memory saved) but each query reads only the pages whose
  upper-bound score ``sum_d max(q_d min_d, q_d max_d)`` is largest, ``budget`` tokens' worth,
  always including the query's own page.

The evicting policies hold at most ``budget`` tokens after each step (the query itself reads up
to ``budget + 1``: it is appended before the policy evicts). Queries are batched rows of one
forward pass; only batch size 1 is supported (one held-out sequence at a time).
"""

from __future__ import annotations

import math

import torch

POLICIES = ("streaming", "tova", "h2o", "quest")


def _check(policy: str, budget: int) -> None:
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    if not isinstance(budget, int) or budget < 2:
        raise ValueError(f"budget: expected an int >= 2 (KV tokens per layer and KV head), got {budget!r}")


def streaming_mask(t: int, budget: int, sinks: int = 4, device=None) -> torch.Tensor:
    """``[T, T]``: the first ``sinks`` keys and the last ``budget - sinks`` before each query (itself included)."""
    sinks = min(sinks, budget - 1)
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    return (j <= i) & ((j < sinks) | (i - j < budget - sinks))


def evicting_mask(policy: str, q: torch.Tensor, k: torch.Tensor, budget: int, rows: int = 256) -> torch.Tensor:
    """TOVA or H2O, simulated token by token. q ``[Hkv, G, T, D]``, k ``[Hkv, T, D]`` -> bool ``[Hkv, T, T]``.

    The scores of ``rows`` queries at a time are exponentiated once (shifted by their row maximum);
    each step then renormalises one row over the keys still alive.
    """
    hkv, _, t, d = q.shape
    scale = 1.0 / math.sqrt(d)
    q, k = q.float(), k.float()
    mask = torch.ones((t, t), dtype=torch.bool, device=q.device).tril().expand(hkv, t, t).clone()
    if t <= budget:
        return mask
    alive = torch.zeros((hkv, t), dtype=torch.bool, device=q.device)
    alive[:, :budget] = True
    acc = None
    if policy == "h2o":
        # attention accumulated by the queries before the first eviction: plain causal softmax
        s = torch.einsum("hgid,hjd->hgij", q[:, :, :budget], k[:, :budget]) * scale
        s = s.masked_fill(~mask[:, None, :budget, :budget], float("-inf"))
        acc = torch.zeros((hkv, t), dtype=torch.float32, device=q.device)
        acc[:, :budget] = torch.softmax(s, -1).mean(1).sum(1)
        recent = budget // 2
    cols = torch.arange(t, device=q.device)
    heads = torch.arange(hkv, device=q.device)
    for c in range(budget, t, rows):
        e = torch.einsum("hgid,hjd->hgij", q[:, :, c: c + rows], k) * scale  # [Hkv, G, rows, T]
        e = e.masked_fill(cols[None, None, None, :] > torch.arange(c, c + e.shape[2], device=q.device)[None, None, :, None],
                          float("-inf"))
        e = torch.exp(e - e.amax(-1, keepdim=True))
        for r in range(e.shape[2]):
            i = c + r
            alive[:, i] = True
            mask[:, i] = alive  # the query reads the cache with itself appended, before the eviction
            w = e[:, :, r, : i + 1] * alive[:, None, : i + 1]
            p = (w / w.sum(-1, keepdim=True)).mean(1)  # [Hkv, i + 1], averaged over the query group
            if policy == "tova":
                score = p.masked_fill(~alive[:, : i + 1], float("inf"))
            else:
                acc[:, : i + 1] += p
                evictable = alive[:, : i + 1] & (cols[: i + 1] <= i - recent)
                score = acc[:, : i + 1].masked_fill(~evictable, float("inf"))
            alive[heads, score.argmin(-1)] = False
    return mask


def quest_mask(q: torch.Tensor, k: torch.Tensor, budget: int, page_size: int = 16) -> torch.Tensor:
    """Quest page selection. q ``[Hkv, G, T, D]``, k ``[Hkv, T, D]`` -> bool ``[Hkv, T, T]``."""
    hkv, _, t, d = q.shape
    pages = -(-t // page_size)
    pad = pages * page_size - t
    kp = torch.nn.functional.pad(k.float(), (0, 0, 0, pad))
    kp = kp.view(hkv, pages, page_size, d)
    valid = (torch.arange(pages * page_size, device=k.device) < t).view(pages, page_size)[None, :, :, None]
    kmax = kp.masked_fill(~valid, float("-inf")).amax(2)  # [Hkv, P, D]
    kmin = kp.masked_fill(~valid, float("inf")).amin(2)
    qf = q.float()
    qpos, qneg = qf.clamp(min=0), qf.clamp(max=0)
    score = (torch.einsum("hgtd,hpd->htp", qpos, kmax) + torch.einsum("hgtd,hpd->htp", qneg, kmin))  # [Hkv, T, P]
    i = torch.arange(t, device=q.device)
    own = i // page_size
    page = torch.arange(pages, device=q.device)
    score = score.masked_fill(page[None, None, :] > own[None, :, None], float("-inf"))
    score = score.masked_fill(page[None, None, :] == own[None, :, None], float("inf"))
    n_pages = min(pages, max(1, budget // page_size))
    top = score.topk(n_pages, dim=-1).indices  # [Hkv, T, n_pages]
    chosen = torch.zeros((hkv, t, pages), dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, top, True)
    chosen &= page[None, None, :] <= own[None, :, None]  # a -inf page picked to fill the top-k is not read
    mask = chosen.repeat_interleave(page_size, dim=-1)[..., :t]
    return mask & (i[None, None, :] <= i[None, :, None])


def policy_mask(policy: str, q: torch.Tensor, k: torch.Tensor, budget: int, sinks: int = 4,
                page_size: int = 16) -> torch.Tensor:
    """The keys each query reads under ``policy``: q ``[Hkv, G, T, D]``, k ``[Hkv, T, D]`` -> ``[Hkv, T, T]``."""
    _check(policy, budget)
    if policy == "streaming":
        return streaming_mask(q.shape[2], budget, sinks, q.device).expand(q.shape[0], -1, -1)
    if policy == "quest":
        return quest_mask(q, k, budget, page_size)
    return evicting_mask(policy, q, k, budget)


class PolicyAttention:
    """Attention backend (``attend(layer, q, k, v, logits)``) under a heuristic policy; run the model
    with eviction off (``logits`` is ignored). Counts, over all layers and KV heads, the tokens held
    at the end, the most held at any step, and the K/V tokens read by all queries."""

    def __init__(self, policy: str, budget: int, sinks: int = 4, page_size: int = 16):
        _check(policy, budget)
        self.policy, self.budget, self.sinks, self.page_size = policy, budget, sinks, page_size
        self.held_peak = 0  # the most tokens held at any step, summed over layers and KV heads
        self.reads = 0

    @property
    def held_end(self) -> int:
        """Tokens held after the last position: no policy here ever shrinks its cache, so the peak."""
        return self.held_peak

    def attend(self, layer, q, k, v, logits):
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        if b != 1:
            raise ValueError(f"q: policy evaluation runs one sequence at a time, got batch {b}")
        g = hq // hkv
        qg = q[0].view(hkv, g, t, d)
        mask = policy_mask(self.policy, qg, k[0], self.budget, self.sinks, self.page_size)
        held = t if self.policy == "quest" else min(t, self.budget)
        self.held_peak += held * hkv
        self.reads += int(mask.sum())
        out = torch.empty_like(q[0]).view(hkv, g, t, d)
        scale = 1.0 / math.sqrt(d)
        for h in range(hkv):  # one KV head at a time keeps the [G, T, T] scores small
            s = torch.einsum("gid,jd->gij", qg[h].float(), k[0, h].float()) * scale
            s = s.masked_fill(~mask[h][None], float("-inf"))
            out[h] = (torch.softmax(s, -1) @ v[0, h].float()).to(q.dtype)
        return out.view(1, hq, t, d)
