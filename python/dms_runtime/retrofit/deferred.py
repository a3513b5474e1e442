"""DMS with its evictions deferred until a pool fills: what a lazy cache would buy, measured teacher-forced.

DMS marks keys for eviction, and a marked key leaves the cache once it is out of the delay window
(semantics §3), so a DMS cache holds the minimum from the first token on. A heuristic policy held to
DMS's peak memory instead holds every key until its budget fills. :class:`DeferredAttention` runs a DMS
model under a lazy rule that spends memory the same way:

* one pool of ``pool`` tokens for all layers and KV heads of the sequence (lists ``N = layers * kv_heads``);
* after position ``t`` the cache holds every key a DMS cache holds plus marked keys that left the window
  (``j <= t - w``), as long as the total stays within the pool; when it would not, the oldest marked keys
  leave first (by position, then layer, then KV head), as many as needed or as exist. Query ``t + 1``
  sees what is held after ``t`` and its own window, as in §3.

So the tokens held after position ``t`` are ``max(m(t), min((t + 1) * N, pool))``, where ``m(t)`` is the
minimum of §3 for the marks this pass makes (they follow the hidden states, which now see more keys, so
they differ a little from DMS's own): pool 0 is DMS itself, a pool of every token is full attention, and a
pool at the policies' budget holds what they hold, every key until it fills. With ``E(t)`` marked keys
gone after position ``t``, ``E(t) = min(max(0, (t + 1) * N - pool), M(t - w))``, ``M(p)`` the keys up to
``p`` that are marked, query ``i`` sees key ``j <= i`` unless it is marked, ``i - j > w`` and fewer than
``E(i - 1)`` marked keys come before it in that order. That needs only marks ``w`` or more positions
old, so a pass in chunks of at most ``w`` positions (:func:`deferred_forward`) computes it exactly,
planned once per chunk for every layer.

The paged runtime does the same with ``PagedConfig.defer_budget`` (``pool = defer_budget * N``), with the
pool's evictions between its steps: a step's queries all see what was held after the step before, and its
own chunk without the window rule (one position per step in decode, so there the two agree exactly). With
``per_step=True`` this backend does that instead, for passes of any length; the runtime is tested against it.
"""

from __future__ import annotations

import heapq

import torch

from dms_kernels import reference as ref

from .policies import masked_attention


class DeferredAttention:
    """Attention backend for a chunked teacher-forced pass of one sequence (batch 1) under the rule above;
    call the model on consecutive chunks of at most ``window`` positions from 0 (:func:`deferred_forward`);
    ``per_step``: chunks of any length, every query of a chunk seeing what was held before it (the paged
    runtime's steps), so the pool's evictions happen between chunks.
    Keeps every layer's keys, values and eviction logits. ``held_peak``: the most tokens held after any
    position, over all lists (the measure of ``evaluate.fidelity``); ``reads``: K/V tokens read by all
    queries."""

    ORDERS = ("oldest", "logit")

    def __init__(self, window: int, pool: int, layers: int, kv_heads: int, per_step: bool = False,
                 order: str = "oldest"):
        if not isinstance(per_step, bool):
            raise ValueError(f"per_step: expected a bool, got {per_step!r}")
        if order not in self.ORDERS:
            raise ValueError(f"order: expected one of {self.ORDERS}, got {order!r}")
        self.per_step, self.order = per_step, order
        for name, value, low in (("window", window, 1), ("pool", pool, 0), ("layers", layers, 1),
                                 ("kv_heads", kv_heads, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        self.window, self.pool, self.layers, self.kv_heads = window, pool, layers, kv_heads
        self.k: list[torch.Tensor | None] = [None] * layers  # [Hkv, T, D]
        self.v: list[torch.Tensor | None] = [None] * layers
        self.logits: list[torch.Tensor | None] = [None] * layers  # [Hkv, T]
        self.reads = 0
        self._plan = None  # (first position of the chunk, marked [L, Hkv, a], rank [L, Hkv, a], gone [n])
        # order="logit": each marked key's drop time (the position after which it left; -1: held), and
        # the heap of marked keys out of the window still held, with the last position decided
        self._dropped = torch.zeros((layers, kv_heads, 0), dtype=torch.long)
        self._heap: list = []
        self._decided = -1

    @property
    def lists(self) -> int:
        return self.layers * self.kv_heads

    @property
    def length(self) -> int:
        """Positions every layer has processed."""
        return 0 if self.logits[-1] is None else self.logits[-1].shape[-1]

    def _marks(self, upto: int) -> torch.Tensor:
        """``[L, Hkv, upto]`` evict decisions of keys ``0 .. upto - 1`` (key ``j``: the logit at ``j + 1``;
        the last one, whose logit is not known before position ``upto``, counts as keep)."""
        stacked = torch.stack([lg[:, :upto] for lg in self.logits])  # [L, Hkv, upto]
        return ref.eviction_decisions(stacked)

    def gone_counts(self, marked: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``E(t)`` for positions ``t`` (int64), from ``marked`` ``[L, Hkv, a]`` that holds every key ``<= t - w``."""
        counts = marked.sum((0, 1)).cumsum(0)
        before = torch.cat([counts.new_zeros(1), counts])  # before[p + 1] = M(p)
        m = before[(t - self.window + 1).clamp(0, marked.shape[-1])]
        return torch.minimum(((t + 1) * self.lists - self.pool).clamp(min=0), m)

    def _plan_chunk(self, start: int, n: int) -> None:
        if n > self.window and not self.per_step:
            raise ValueError(f"chunk: expected at most window={self.window} positions, got {n}")
        if start != self.length:
            raise ValueError(f"positions: expected the chunk after position {self.length - 1}, got one from {start}")
        marked = (self._marks(start) if start  # keys 0 .. start - 1; key start - 1 is inside every query's window
                  else torch.zeros((self.layers, self.kv_heads, 0), dtype=torch.bool))
        before = torch.full((n,), start) if self.per_step else torch.arange(start, start + n)
        # query i sees marked key j out of its window unless rank(j) < gone(i): for "oldest", rank is the
        # key's place in (position, layer, KV head) order and gone the count E(i - 1); for "logit", rank is
        # the position after which the key was dropped (-1: held) and gone is i
        if self.order == "logit":
            self._drop_by_logit(marked, int(before[-1]) - 1)
            rank = self._dropped[..., :start]
            self._plan = (start, marked & (rank >= 0), rank, before)
            return
        flat = marked.permute(2, 0, 1).reshape(-1).long()
        rank = (flat.cumsum(0) - flat).view(start, self.layers, self.kv_heads).permute(1, 2, 0)
        self._plan = (start, marked, rank, self.gone_counts(marked, before - 1))

    def _drop_by_logit(self, marked: torch.Tensor, upto: int) -> None:
        """``order="logit"``: decide the drops after positions up to ``upto``: after position ``t`` the marked
        keys at ``t - w`` join the candidates, and the ``E(t)`` count is reached by dropping the candidates
        the adapter is surest of (largest eviction logit; ties: oldest, then layer, then KV head)."""
        length = marked.shape[-1]
        grown = torch.full((self.layers, self.kv_heads, length), -1, dtype=torch.long)
        grown[..., :self._dropped.shape[-1]] = self._dropped
        self._dropped = grown
        if upto <= self._decided:
            return
        t = torch.arange(self._decided + 1, upto + 1)
        counts = self.gone_counts(marked, t).tolist()
        done = int(self._dropped.ge(0).sum())
        # key j's logit is at j + 1 (none before the first chunk: no key has a mark yet)
        scores = torch.stack([lg[:, 1:length + 1] for lg in self.logits]) if length else None
        for pos, target in zip(t.tolist(), counts):
            j = pos - self.window
            if j >= 0:
                for layer, head in marked[:, :, j].nonzero().tolist():
                    heapq.heappush(self._heap, (-float(scores[layer, head, j]), j, layer, head))
            while done < target:
                _, key, layer, head = heapq.heappop(self._heap)
                self._dropped[layer, head, key] = pos
                done += 1
        self._decided = upto

    def attend(self, layer, q, k, v, logits):
        b, hq, n, d = q.shape
        if b != 1:
            raise ValueError(f"q: the deferred evaluation runs one sequence at a time, got batch {b}")
        if logits is None:
            raise ValueError("logits: the deferred evaluation needs a DMS model with eviction on")
        if layer == 0:
            self._plan_chunk(self.length, n)
        start, marked, rank, gone = self._plan
        for store, x in ((self.k, k[0]), (self.v, v[0]), (self.logits, logits[0])):
            store[layer] = x if store[layer] is None else torch.cat([store[layer], x], 1)
        total = start + n
        hkv = k.shape[1]
        i = torch.arange(start, total)[:, None]
        j = torch.arange(total)[None]
        mask = (j <= i).expand(hkv, n, total).clone()  # [Hkv, n, total]
        # a marked key before the chunk is gone for query i if it left the window and rank < gone (_plan_chunk)
        old = marked[layer][:, None, :] & (rank[layer][:, None, :] < gone[None, :, None]) \
            & (i - j[:, :start] > self.window)[None]
        mask[:, :, :start] &= ~old
        self.reads += int(mask.sum())
        qg = q[0].view(hkv, hq // hkv, n, d)
        return masked_attention(qg, self.k[layer], self.v[layer], mask).view(1, hq, n, d)

    @property
    def held_over_time(self) -> torch.Tensor:
        """``[T]``: tokens held after each position, over all lists."""
        t = torch.arange(self.length)
        return (t + 1) * self.lists - self.gone_counts(self._marks(self.length), t)

    @property
    def held_peak(self) -> int:
        return int(self.held_over_time.max()) if self.length else 0


@torch.inference_mode()
def deferred_forward(model, ids: list[int], window: int, pool: int, steps: list[int] | None = None,
                     order: str = "oldest") -> tuple[torch.Tensor, DeferredAttention]:
    """Teacher-forced logits ``[1, T, V]`` of token ids ``ids`` (positions from 0) under
    :class:`DeferredAttention` with ``pool`` tokens, in chunks of ``window`` positions; and the backend.
    ``steps``: the lengths of the passes instead, with the pool's evictions between them (``per_step``)."""
    cfg = model.config
    if steps is not None and (not all(isinstance(n, int) and n >= 1 for n in steps) or sum(steps) != len(ids)):
        raise ValueError(f"steps: expected positive lengths adding up to {len(ids)} positions, got {steps!r}")
    backend = DeferredAttention(window, pool, cfg.num_layers, cfg.num_kv_heads, per_step=steps is not None,
                                order=order)
    if steps is None:
        steps = [min(window, len(ids) - a) for a in range(0, len(ids), window)]
    t = torch.tensor([ids], device=model.device)
    out, a = [], 0
    for n in steps:
        out.append(model(t[:, a:a + n], torch.arange(a, a + n, device=model.device)[None], backend))
        a += n
    return torch.cat(out, 1), backend
