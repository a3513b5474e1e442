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

The attention runs on a read plan (:func:`policy_plan`): chunks of query rows, each with the keys its
queries can read and the mask over those, so a prefill under a budget costs O(T * budget) for
StreamingLLM, TOVA and H2O (Quest: the causal prefix); :func:`policy_mask` is the same plan as a
dense ``[Hkv, T, T]`` mask.

For scoring by generation, :class:`PolicyCache` runs the same rules during greedy decoding: the
prompt's prefill is masked as above and leaves the cache the policy holds (StreamingLLM, TOVA and
H2O keep only their held keys), then each new token's query reads the keys the policy leaves it
(:func:`quest_row`, :func:`evicting_step`), O(budget) per token for the evicting policies;
:func:`policy_generate` is the greedy loop.
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


def policy_budget(fraction: float, length: int) -> int:
    """The KV tokens per layer and KV head a policy gets for ``fraction`` of ``length`` (at least 2)."""
    return max(2, math.ceil(fraction * length))


def policy_reads(policy: str, budget: int, length: int) -> int:
    """K/V tokens one KV head reads over a teacher-forced sequence of ``length`` under ``policy`` at
    ``budget``: query ``i`` reads ``min(i + 1, budget)`` keys under StreamingLLM (Quest: about that, its budget
    in whole pages), ``min(i + 1, budget + 1)`` under TOVA and H2O, which append the query before they evict."""
    _check(policy, budget)
    cap = budget + (policy in ("tova", "h2o"))
    if cap >= length:
        return length * (length + 1) // 2
    return cap * (cap + 1) // 2 + (length - cap) * cap


def read_budget(policy: str, read_fraction: float, length: int) -> int:
    """The smallest budget (at least 2) at which ``policy`` reads at least ``read_fraction`` of what dense
    attention reads over ``length`` tokens (:func:`policy_reads`): the budget that matches a method's
    KV tokens read, the bytes a decode step moves, where :func:`policy_budget` matches the tokens held."""
    if not 0.0 < read_fraction <= 1.0:
        raise ValueError(f"read_fraction: expected a fraction in (0, 1], got {read_fraction!r}")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length: expected an int >= 1, got {length!r}")
    target = read_fraction * length * (length + 1) / 2
    lo, hi = 2, max(2, length)
    while lo < hi:
        mid = (lo + hi) // 2
        if policy_reads(policy, mid, length) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def streaming_mask(t: int, budget: int, sinks: int = 4, device=None) -> torch.Tensor:
    """``[T, T]``: the first ``sinks`` keys and the last ``budget - sinks`` before each query (itself included)."""
    sinks = min(sinks, budget - 1)
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    return (j <= i) & ((j < sinks) | (i - j < budget - sinks))


# A read plan: the keys each query reads, row chunk by row chunk, as a list of ``(start, keys, mask)``:
# queries ``start .. start + n - 1`` read, of the keys ``keys [Hkv, C]`` (positions, ascending), those
# where ``mask [Hkv, n, C]`` is set. A chunk lists only the keys some of its queries can read, so the
# attention over a plan costs O(T * budget), not O(T^2).
ReadPlan = list[tuple[int, torch.Tensor, torch.Tensor]]


def _causal_chunks(t: int, hkv: int, rows: int, device) -> ReadPlan:
    """Every query reads every key up to itself."""
    plan = []
    for c in range(0, t, rows):
        n = min(rows, t - c)
        keys = torch.arange(c + n, device=device)
        plan.append((c, keys.expand(hkv, -1), (keys[None, :] <= torch.arange(c, c + n, device=device)[:, None])
                     .expand(hkv, -1, -1)))
    return plan


def streaming_plan(t: int, hkv: int, budget: int, sinks: int = 4, rows: int = 256, device=None) -> ReadPlan:
    """StreamingLLM's reads (:func:`streaming_mask`) as a read plan: each chunk lists the sinks and
    the window its queries share."""
    sinks = min(sinks, budget - 1)
    plan = []
    for c in range(0, t, rows):
        n = min(rows, t - c)
        lo = max(0, c - (budget - sinks) + 1)  # the oldest key after the sinks that query ``c`` reads
        keys = torch.cat([torch.arange(min(sinks, lo), device=device), torch.arange(lo, c + n, device=device)])
        i = torch.arange(c, c + n, device=device)[:, None]
        m = (keys[None, :] <= i) & ((keys[None, :] < sinks) | (i - keys[None, :] < budget - sinks))
        plan.append((c, keys.expand(hkv, -1), m.expand(hkv, -1, -1)))
    return plan


def evicting_plan(policy: str, q: torch.Tensor, k: torch.Tensor, budget: int, rows: int = 256):
    """TOVA or H2O, simulated token by token. q ``[Hkv, G, T, D]``, k ``[Hkv, T, D]`` -> the read
    plan, and the cache after the last query: ``(plan, alive [Hkv, T], acc [Hkv, T] or None)``.

    The first ``budget`` queries evict nothing (causal chunks). After them, a chunk of ``rows`` queries
    can read only the cache at the chunk's start (``budget`` keys) and the chunk's own keys; their
    scores over those ``budget + rows`` keys are computed once, and each step appends its query's key,
    records what the query reads, and evicts one key: a softmax over the keys alive, so a step costs
    O(budget + rows), not O(T). Keys are in ascending order, so ties go to the oldest key.
    """
    hkv, _, t, d = q.shape
    scale = 1.0 / math.sqrt(d)
    q, k = q.float(), k.float()
    dev = q.device
    n0 = min(t, budget)
    plan = _causal_chunks(n0, hkv, rows, dev)
    acc = None
    if policy == "h2o":
        # attention accumulated by the queries before the first eviction: plain causal softmax
        s = torch.einsum("hgid,hjd->hgij", q[:, :, :n0], k[:, :n0]) * scale
        s = s.masked_fill(torch.ones((n0, n0), dtype=torch.bool, device=dev).triu(1), float("-inf"))
        acc = torch.zeros((hkv, t), dtype=torch.float32, device=dev)
        acc[:, :n0] = torch.softmax(s, -1).mean(1).sum(1)
        recent = budget // 2
    if t <= budget:
        return plan, torch.ones((hkv, t), dtype=torch.bool, device=dev), acc
    heads = torch.arange(hkv, device=dev)
    held = torch.arange(budget, device=dev).expand(hkv, -1)  # the cache's keys, ascending
    held_acc = acc[:, :budget] if acc is not None else None
    for c in range(budget, t, rows):
        n = min(rows, t - c)
        keys = torch.cat([held, torch.arange(c, c + n, device=dev).expand(hkv, n)], 1)  # [Hkv, budget + n]
        s = torch.einsum("hgid,hjd->hgij", q[:, :, c: c + n], _gather(k, keys)) * scale  # [Hkv, G, n, C]
        alive = torch.zeros(keys.shape, dtype=torch.bool, device=dev)
        alive[:, :budget] = True
        m = torch.empty((hkv, n, keys.shape[1]), dtype=torch.bool, device=dev)
        if held_acc is not None:
            kacc = torch.cat([held_acc, torch.zeros((hkv, n), device=dev)], 1)
        for r in range(n):
            alive[:, budget + r] = True
            m[:, r] = alive  # the query reads the cache with itself appended, before the eviction
            dead = ~alive
            p = torch.softmax(s[:, :, r].masked_fill(dead[:, None], float("-inf")), -1).mean(1)  # over the group
            if held_acc is None:
                score = p.masked_fill(dead, float("inf"))
            else:
                kacc += p
                score = kacc.masked_fill(dead | (keys > c + r - recent), float("inf"))
            alive[heads, score.argmin(-1)] = False  # argmin: the first of equal scores, the oldest key
        plan.append((c, keys, m))
        held = keys[alive].view(hkv, budget)  # row-major: head by head, ascending
        if held_acc is not None:
            held_acc = kacc[alive].view(hkv, budget)
    alive = torch.zeros((hkv, t), dtype=torch.bool, device=dev)
    alive.scatter_(1, held, True)
    if acc is not None:
        acc.scatter_(1, held, held_acc)
    return plan, alive, acc


def evicting_mask(policy: str, q: torch.Tensor, k: torch.Tensor, budget: int, rows: int = 256) -> torch.Tensor:
    """TOVA or H2O (:func:`evicting_plan`) as a dense mask: q ``[Hkv, G, T, D]``, k ``[Hkv, T, D]`` -> bool ``[Hkv, T, T]``."""
    return plan_mask(evicting_plan(policy, q, k, budget, rows)[0], q.shape[0], q.shape[2])


def plan_mask(plan: ReadPlan, hkv: int, t: int) -> torch.Tensor:
    """A read plan as a dense mask ``[Hkv, T, T]`` over positions."""
    mask = torch.zeros((hkv, t, t), dtype=torch.bool, device=plan[0][1].device if plan else None)
    for c, keys, m in plan:
        n = m.shape[1]
        mask[:, c: c + n].scatter_(2, keys[:, None].expand(-1, n, -1), m)
    return mask


def evicting_step(policy: str, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, acc: torch.Tensor | None,
                  budget: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decoded query of TOVA or H2O on the held keys alone, the same rule as one row of
    :func:`evicting_mask`, in O(budget).

    q ``[Hkv, G, D]`` at position ``i = pos[:, -1]``; k ``[Hkv, n + 1, D]``: the keys held before it
    then its own; pos ``[Hkv, n + 1]``: their positions, ascending (so ties go to the oldest key);
    acc (H2O) ``[Hkv, n]``: the held keys' accumulated attention. The query reads all ``n + 1``.
    Returns the columns of k still held after its eviction (``keep [Hkv, m]``, ascending;
    ``m = n + 1`` while the cache is under budget, else ``budget``) and their acc (H2O; else None).
    """
    hkv, _, d = q.shape
    n1 = k.shape[1]
    if pos.shape != (hkv, n1):
        raise ValueError(f"pos: expected shape {(hkv, n1)}, got {tuple(pos.shape)}")
    p = torch.softmax(torch.einsum("hgd,hjd->hgj", q.float(), k.float()) * (1.0 / math.sqrt(d)), -1).mean(1)
    if policy == "h2o":
        acc = torch.cat([acc, torch.zeros((hkv, 1), dtype=acc.dtype, device=acc.device)], 1) + p
    cols = torch.arange(n1, device=q.device).expand(hkv, -1)
    if n1 <= budget:
        return cols, acc
    if policy == "tova":
        score = p
    else:
        score = acc.masked_fill(pos > pos[:, -1:] - budget // 2, float("inf"))
    victim = score.argmin(-1, keepdim=True)  # the first of equal scores: the oldest key
    keep = cols[:, :-1] + (cols[:, :-1] >= victim).long()  # every column but the victim's, in order
    return keep, (acc.gather(1, keep) if acc is not None else None)


def _page_bounds(k: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest's per-page key bounds: k ``[Hkv, T, D]`` -> (max, min) over each page's keys, ``[Hkv, P, D]``."""
    hkv, t, d = k.shape
    pages = -(-t // page_size)
    kp = torch.nn.functional.pad(k.float(), (0, 0, 0, pages * page_size - t)).view(hkv, pages, page_size, d)
    valid = (torch.arange(pages * page_size, device=k.device) < t).view(pages, page_size)[None, :, :, None]
    return kp.masked_fill(~valid, float("-inf")).amax(2), kp.masked_fill(~valid, float("inf")).amin(2)


def quest_plan(q: torch.Tensor, k: torch.Tensor, budget: int, page_size: int = 16, rows: int = 256) -> ReadPlan:
    """Quest page selection as a read plan: q ``[Hkv, G, T, D]``, k ``[Hkv, T, D]``; a chunk of
    queries lists every key up to its last query (Quest keeps them all)."""
    hkv, _, t, _ = q.shape
    dev = q.device
    pages = -(-t // page_size)
    kmax, kmin = _page_bounds(k, page_size)
    qf = q.float()
    qpos, qneg = qf.clamp(min=0), qf.clamp(max=0)
    page = torch.arange(pages, device=dev)
    n_pages = min(pages, max(1, budget // page_size))
    plan = []
    for c in range(0, t, rows):
        n = min(rows, t - c)
        i = torch.arange(c, c + n, device=dev)
        own = (i // page_size)[None, :, None]
        score = (torch.einsum("hgtd,hpd->htp", qpos[:, :, c: c + n], kmax)
                 + torch.einsum("hgtd,hpd->htp", qneg[:, :, c: c + n], kmin))  # [Hkv, n, P]
        score = score.masked_fill(page > own, float("-inf")).masked_fill(page == own, float("inf"))
        top = score.topk(n_pages, dim=-1).indices
        chosen = torch.zeros((hkv, n, pages), dtype=torch.bool, device=dev)
        chosen.scatter_(-1, top, True)
        chosen &= page <= own  # a -inf page picked to fill the top-k is not read
        keys = torch.arange(c + n, device=dev)
        m = chosen.repeat_interleave(page_size, dim=-1)[..., : c + n] & (keys[None, None, :] <= i[None, :, None])
        plan.append((c, keys.expand(hkv, -1), m))
    return plan


def quest_mask(q: torch.Tensor, k: torch.Tensor, budget: int, page_size: int = 16) -> torch.Tensor:
    """Quest page selection (:func:`quest_plan`) as a dense mask: q ``[Hkv, G, T, D]``, k ``[Hkv, T, D]`` -> bool ``[Hkv, T, T]``."""
    return plan_mask(quest_plan(q, k, budget, page_size), q.shape[0], q.shape[2])


def quest_row(q: torch.Tensor, k: torch.Tensor, budget: int, page_size: int = 16) -> torch.Tensor:
    """Quest page selection for one decoded query (the last row of :func:`quest_mask`):
    q ``[Hkv, G, D]`` at position ``i = k.shape[1] - 1``, k ``[Hkv, i + 1, D]`` -> bool ``[Hkv, i + 1]``."""
    hkv, n, _ = k.shape
    pages = -(-n // page_size)
    kmax, kmin = _page_bounds(k, page_size)
    qf = q.float()
    score = (torch.einsum("hgd,hpd->hp", qf.clamp(min=0), kmax) + torch.einsum("hgd,hpd->hp", qf.clamp(max=0), kmin))
    score[:, pages - 1] = float("inf")  # the query's own page
    top = score.topk(min(pages, max(1, budget // page_size)), dim=-1).indices
    chosen = torch.zeros((hkv, pages), dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, top, True)
    return chosen.repeat_interleave(page_size, dim=-1)[:, :n]


def streaming_row(i: int, budget: int, sinks: int = 4, device=None) -> torch.Tensor:
    """``[i + 1]``: the keys query ``i`` reads under StreamingLLM (the last row of :func:`streaming_mask`)."""
    sinks = min(sinks, budget - 1)
    j = torch.arange(i + 1, device=device)
    return (j < sinks) | (i - j < budget - sinks)


def policy_plan(policy: str, q: torch.Tensor, k: torch.Tensor, budget: int, sinks: int = 4,
                page_size: int = 16, rows: int = 256) -> ReadPlan:
    """The keys each query reads under ``policy`` as a read plan: q ``[Hkv, G, T, D]``, k ``[Hkv, T, D]``."""
    _check(policy, budget)
    if policy == "streaming":
        return streaming_plan(q.shape[2], q.shape[0], budget, sinks, rows, q.device)
    if policy == "quest":
        return quest_plan(q, k, budget, page_size, rows)
    return evicting_plan(policy, q, k, budget, rows)[0]


def policy_mask(policy: str, q: torch.Tensor, k: torch.Tensor, budget: int, sinks: int = 4,
                page_size: int = 16) -> torch.Tensor:
    """The keys each query reads under ``policy``: q ``[Hkv, G, T, D]``, k ``[Hkv, T, D]`` -> ``[Hkv, T, T]``."""
    return plan_mask(policy_plan(policy, q, k, budget, sinks, page_size), q.shape[0], q.shape[2])


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
        plan = policy_plan(self.policy, qg, k[0], self.budget, self.sinks, self.page_size)
        held = t if self.policy == "quest" else min(t, self.budget)
        self.held_peak += held * hkv
        self.reads += plan_reads(plan)
        return plan_attention(qg, k[0], v[0], plan).view(1, hq, t, d)


def plan_reads(plan: ReadPlan) -> int:
    """The K/V tokens read by all queries of a plan, over its KV heads."""
    return int(sum(m.sum() for _, _, m in plan)) if plan else 0


def plan_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ReadPlan) -> torch.Tensor:
    """q ``[Hkv, G, T, D]``, k/v ``[Hkv, T, D]`` -> ``[Hkv, G, T, D]``: each chunk of queries attends
    over the keys its plan lists (gathered), masked as the plan says."""
    out = torch.empty_like(q)
    for c, keys, m in plan:
        n = m.shape[1]
        out[:, :, c: c + n] = masked_attention(q[:, :, c: c + n], _gather(k, keys), _gather(v, keys), m)
    return out


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q ``[Hkv, G, T, D]``, k/v ``[Hkv, S, D]``, mask ``[Hkv, T, S]`` (every row reads a key) ->
    ``[Hkv, G, T, D]``: SDPA in float32 with the mask shared by a KV head's query group."""
    hkv, g, _, d = q.shape
    s = k.shape[1]
    # k/v expanded over the group (a view): SDPA's fused CPU kernel wants them the shape of q
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float()[:, None].expand(hkv, g, s, d), v.float()[:, None].expand(hkv, g, s, d),
        attn_mask=mask[:, None])
    return out.to(q.dtype)


class PolicyCache:
    """Attention backend for greedy generation under a heuristic policy: a prefill of the prompt (one
    call per layer with all its tokens, read as :func:`policy_plan` plans), then one token per call.
    Each decoded query reads the keys the policy leaves it: the same rules as the teacher-forced
    masks, run step by step.

    StreamingLLM, TOVA and H2O hold only the keys their policy keeps (``pos[layer]`` ``[Hkv, n]``,
    ascending, with their K/V and, for H2O, accumulated attention): a decoded token appends its key,
    reads the held keys, and the policy evicts (:func:`evicting_step`; StreamingLLM evicts first, so
    its query reads ``budget`` keys, TOVA's and H2O's ``budget + 1``), O(budget) per token. Quest
    keeps every key by design and reads the pages :func:`quest_row` picks.
    ``held_peak`` counts, over layers and KV heads, the most tokens a policy's cache holds, ``reads``
    the K/V tokens read by all queries. ``record``: keep each layer's read rows over positions
    (``masks[layer]``: ``[Hkv, T, T]``) for tests. Batch 1 only.
    """

    def __init__(self, policy: str, budget: int, sinks: int = 4, page_size: int = 16, record: bool = False):
        _check(policy, budget)
        self.policy, self.budget, self.sinks, self.page_size = policy, budget, sinks, page_size
        self.k: dict[int, torch.Tensor] = {}  # [Hkv, n, D]: the held keys (Quest: all)
        self.v: dict[int, torch.Tensor] = {}
        self.pos: dict[int, torch.Tensor] = {}  # [Hkv, n]: their positions (StreamingLLM, TOVA, H2O)
        self.acc: dict[int, torch.Tensor | None] = {}  # [Hkv, n]: H2O's accumulated attention
        self.length: dict[int, int] = {}  # tokens seen
        self.held: dict[int, int] = {}
        self.reads = 0
        self.masks: dict[int, torch.Tensor] | None = {} if record else None

    @property
    def held_peak(self) -> int:
        return sum(self.held.values())

    def _prefill(self, layer, qg, k, v) -> ReadPlan:
        """The prompt's read plan; leaves the cache the policy holds after it."""
        hkv, t = k.shape[0], k.shape[1]
        acc = None
        if self.policy in ("tova", "h2o"):
            plan, alive, acc = evicting_plan(self.policy, qg, k, self.budget)
        else:
            plan = policy_plan(self.policy, qg, k, self.budget, self.sinks, self.page_size)
            alive = None if self.policy == "quest" else streaming_row(t - 1, self.budget, self.sinks, k.device).expand(hkv, -1)
        if alive is None:
            self.k[layer], self.v[layer] = k.clone(), v.clone()
        else:
            # every head holds the same number of keys: nonzero lists them head by head, ascending
            pos = alive.nonzero()[:, 1].view(hkv, -1)
            self.pos[layer], self.k[layer], self.v[layer] = pos, _gather(k, pos), _gather(v, pos)
            self.acc[layer] = acc.gather(1, pos) if acc is not None else None
        return plan

    def _decode(self, layer, qg, k, v) -> tuple:
        """One query at position ``i``, its key ``k [Hkv, 1, D]`` appended: the keys and values it
        reads ``[Hkv, n, D]``, the read mask over them ``[Hkv, 1, n]`` and their positions ``[Hkv, n]``
        (None: column = position); leaves the cache as the policy's eviction does."""
        hkv = k.shape[0]
        kk, vv = torch.cat([self.k[layer], k], 1), torch.cat([self.v[layer], v], 1)
        if self.policy == "quest":
            self.k[layer], self.v[layer] = kk, vv
            return kk, vv, quest_row(qg[:, :, 0], kk, self.budget, self.page_size)[:, None], None
        i = self.length[layer]
        pos = torch.cat([self.pos[layer], torch.full((hkv, 1), i, dtype=torch.long, device=k.device)], 1)
        if self.policy == "streaming":
            if pos.shape[1] > self.budget:  # the oldest key after the sinks leaves before the query reads
                sinks = min(self.sinks, self.budget - 1)
                pos, kk, vv = (torch.cat([x[:, :sinks], x[:, sinks + 1:]], 1) for x in (pos, kk, vv))
            self.pos[layer], self.k[layer], self.v[layer] = pos, kk, vv
        else:  # TOVA, H2O: the query reads every held key and its own, then one leaves
            keep, self.acc[layer] = evicting_step(self.policy, qg[:, :, 0], kk, pos, self.acc[layer], self.budget)
            self.pos[layer], self.k[layer], self.v[layer] = pos.gather(1, keep), _gather(kk, keep), _gather(vv, keep)
        return kk, vv, torch.ones((hkv, 1, pos.shape[1]), dtype=torch.bool, device=k.device), pos

    def attend(self, layer, q, k, v, logits):
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        if b != 1:
            raise ValueError(f"q: policy generation runs one sequence at a time, got batch {b}")
        qg = q[0].view(hkv, hq // hkv, t, d)
        if layer not in self.length:
            plan = self._prefill(layer, qg, k[0], v[0])
            self.length[layer] = t
            self.reads += plan_reads(plan)
            if self.masks is not None:
                self.masks[layer] = plan_mask(plan, hkv, t)
            out = plan_attention(qg, k[0], v[0], plan)
        else:
            if t != 1:
                raise ValueError(f"q: after the prefill, one token per call, got {t}")
            keys, values, mask, read_pos = self._decode(layer, qg, k[0], v[0])
            self.length[layer] += 1
            self.reads += int(mask.sum())
            if self.masks is not None:
                self._record(layer, mask, read_pos)
            out = masked_attention(qg, keys, values, mask)
        self.held[layer] = max(self.held.get(layer, 0), self.k[layer].shape[1] * hkv)
        return out.view(1, hq, t, d)

    def _record(self, layer, mask, read_pos):
        """Appends a decoded row (over the columns it read, ``mask [Hkv, 1, n]``) to ``masks[layer]`` over positions."""
        hkv, n = mask.shape[0], self.length[layer]
        if read_pos is not None:  # over held columns -> over positions
            row = torch.zeros((hkv, 1, n), dtype=torch.bool, device=mask.device)
            row.scatter_(2, read_pos[:, None], mask)
            mask = row
        grown = torch.zeros((hkv, n, n), dtype=torch.bool, device=mask.device)
        grown[:, : n - 1, : n - 1] = self.masks[layer]
        grown[:, n - 1:] = mask
        self.masks[layer] = grown


def _gather(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x ``[Hkv, n, D]`` at columns keep ``[Hkv, m]`` -> ``[Hkv, m, D]``."""
    return x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))


@torch.inference_mode()
def policy_generate(model, prompt_ids: list[int], policy: str, budget: int, max_new_tokens: int,
                    eos_ids=(), sinks: int = 4, page_size: int = 16) -> tuple[list[int], PolicyCache]:
    """Greedy generation of ``model`` (run with eviction off) under ``policy`` at ``budget`` KV tokens
    per layer and KV head: the new token ids (ending at the first EOS, which is kept) and the backend."""
    from .training_backend import eviction_off

    if not prompt_ids:
        raise ValueError("prompt_ids: expected a non-empty list of token ids")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    backend = PolicyCache(policy, budget, sinks, page_size)
    dev = model.device
    out: list[int] = []
    with eviction_off(model):
        n = len(prompt_ids)
        logits = model(torch.tensor([prompt_ids], device=dev), torch.arange(n, device=dev)[None], backend,
                       logits_index=torch.tensor([n - 1], device=dev))
        for step in range(max_new_tokens):
            tok = int(torch.argmax(logits[0, -1]))
            out.append(tok)
            if tok in eos_ids or step == max_new_tokens - 1:
                break
            logits = model(torch.tensor([[tok]], device=dev), torch.tensor([[n + step]], device=dev), backend)
    return out, backend
