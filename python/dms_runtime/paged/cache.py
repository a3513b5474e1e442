"""The paged per-head variable-length KV cache.

One pool of fixed-size pages is shared by all layers, sequences and KV heads. Every
(layer, sequence slot, KV head) triple is a *list* with its own page-table row, so heads hold
different numbers of tokens. A list has two regions (see docs/ARCHITECTURE.md):

* the **ring**: the last ``w`` positions, in ``R = ceil(w / page_size)`` pages, slot
  ``pos % w``. These tokens are still inside the delay window, visible whatever their decision.
* the **kept store**: tokens that left the window with a *keep* decision, appended densely.
  DMS decisions are final, so kept pages are append-only and never hold a dead token.

A token whose window ends with an *evict* decision is simply not copied to the kept store: its
ring slot is overwritten by the token ``w`` positions later. After processing positions ``0..t``
a list holds exactly ``min(t + 1, w) + kept`` tokens, the minimum of the semantics (§3).

**Deferred eviction** (``PagedConfig.defer_budget`` > 0): a sequence may hold up to
``defer_budget`` tokens per list on average (``defer_budget * layers * kv_heads`` in all) the way a
heuristic at that budget does. Every token leaving the window then goes to the kept store, marked
ones with their position in ``marked_pos``; attention sees the ring and the new chunk without the
window rule (their decisions go to ``ring_mark``, ``ring_evict`` stays keep). After each step, while
the sequence holds more than its pool, its oldest marked keys (position, then layer, then KV head)
leave: each list's kept store closes the holes with its own last tokens (attention does not depend
on the kept store's order) and gives back the pages past its new end. Query ``i`` then sees what
``retrofit.deferred`` defines, with the pool's evictions at step boundaries (per position in decode).

All bookkeeping is tensor operations over every list of a step at once. The pages a step may
need are reserved before its first layer (the worst case of :class:`PageBudget`, counted on the
host), so the per-layer record and store do no host work and never wait for the device; the
reserved pages a step did not fill are returned when it ends (one sync per step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import validation as V
from ..config import ModelConfig
from .budget import PageBudget


@dataclass(slots=True)
class PagedConfig:
    """Settings of the paged runtime.

    page_size: tokens per page. num_pages: pages in the pool (shared by all layers, sequences
    and KV heads); None sizes it from ``kv_memory_bytes``, or, without that, for ``max_seqs``
    dense sequences of ``max_model_len`` but at most 1 GiB (``generate()`` sizes it per call). max_seqs: sequence slots (batch capacity).
    prefill_chunk: prompt tokens per prefill step (chunked prefill). attention: which
    attention implementation runs ("auto", "torch", or a registered kernel backend).
    """

    page_size: int = 16
    num_pages: int | None = None
    kv_memory_bytes: int | None = None
    max_seqs: int = 16
    max_model_len: int | None = None
    prefill_chunk: int = 512
    attention: str = "auto"
    defer_budget: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Types and ranges (run at creation and again by the engine that consumes the settings)."""
        self.page_size = V.integer("page_size", self.page_size, 1, V.MAX_PAGE_SIZE)
        self.max_seqs = V.integer("max_seqs", self.max_seqs, 1, V.MAX_SEQS)
        self.prefill_chunk = V.integer("prefill_chunk", self.prefill_chunk, 1, V.MAX_TOKENS)
        self.num_pages = V.optional_integer("num_pages", self.num_pages, 1, V.MAX_PAGES)
        self.kv_memory_bytes = V.optional_integer("kv_memory_bytes", self.kv_memory_bytes, 1)
        self.max_model_len = V.optional_integer("max_model_len", self.max_model_len, 1, V.MAX_TOKENS)
        self.defer_budget = V.integer("defer_budget", self.defer_budget, 0, V.MAX_TOKENS)
        if not isinstance(self.attention, str):
            raise V.SettingTypeError(f"attention: expected a backend name (a string), got {self.attention!r}")


class PoolExhausted(RuntimeError):
    """Raised (before anything is written) when a step would need more pages than are free."""


class PagedKVCache:
    """Pool, page tables and per-list state. Shapes (``NL = L * max_seqs * Hkv`` lists):

    k_pool, v_pool  [P, page_size, D]   model dtype
    page_ref        [P]                 int32, references to a page (0 = free)
    free_stack      [P]                 int64, free page ids in [0, free_top)
    page_table      [NL, R + K]         int64, -1 = none; columns [0, R) ring, [R, R + K) kept store
    kept_len        [NL]                int64, tokens in the kept store
    ring_evict      [NL, w]             bool, decision of the token in each ring slot
    seq_len         [max_seqs]          int64, positions processed by each slot

    deferring (``defers``): ring_mark ``[NL, w]`` bool takes the decisions (ring_evict stays keep) and
    marked_pos ``[(P + 1) * page_size]`` int32 the position of each marked token in a kept store (-1: kept);
    scan_from ``[NL]`` int64 a kept index per list below which no token is marked (where the drops scan).
    """

    def __init__(self, cfg: ModelConfig, pcfg: PagedConfig, dtype: torch.dtype, device, max_model_len: int):
        self.cfg, self.pcfg = cfg, pcfg
        self.dtype, self.device = dtype, torch.device(device)
        self.L, self.H, self.D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        self.ps = pcfg.page_size
        self.evicts = cfg.dms_active
        self.defers = self.evicts and pcfg.defer_budget > 0
        # Without eviction every token is kept; the ring is then a one-page staging area.
        # A window at least as long as the longest sequence never lets a token leave: a ring of
        # max_model_len slots behaves the same and keeps a huge dms_window_size from sizing the tables.
        self.w = min(cfg.dms.window_size, max_model_len) if self.evicts else self.ps
        self.R = math.ceil(self.w / self.ps)
        self.max_model_len = max_model_len
        # kept-store columns: enough for every position, plus one that a step's worst-case
        # reservation may touch past the last page it can fill (returned at the end of the step)
        self.K = math.ceil(max_model_len / self.ps) + 1
        self.max_seqs = pcfg.max_seqs
        self.NL = self.L * self.max_seqs * self.H
        self.token_bytes = 2 * self.D * dtype.itemsize  # K and V of one token of one head
        self.budget = PageBudget(self.L, self.H, self.w, self.ps)
        self.pool_tokens = pcfg.defer_budget * self.L * self.H  # per sequence, when deferring

        if pcfg.num_pages is not None:
            pages = pcfg.num_pages
        elif pcfg.kv_memory_bytes is not None:
            pages = pcfg.kv_memory_bytes // (self.ps * self.token_bytes)
        else:
            pages = min(self.L * self.H * self.max_seqs * (self.R + self.K), (1 << 30) // (self.ps * self.token_bytes))
        if pages < 1:
            raise ValueError(f"num_pages: the pool would hold {pages} pages; give more kv_memory_bytes")
        self.P = int(pages)
        dev = self.device
        V.check_allocation(f"paged cache (num_pages={self.P}, page_size={self.ps}, max_seqs={self.max_seqs}, "
                           f"max_model_len={max_model_len})", self.nbytes(), dev)
        # page P is never handed out: masked writes of the store go there (no host-side selection)
        self.k_pool = torch.zeros((self.P + 1, self.ps, self.D), dtype=dtype, device=dev)
        self.v_pool = torch.zeros((self.P + 1, self.ps, self.D), dtype=dtype, device=dev)
        self.trash = self.P * self.ps  # flat index of the spare page's first token
        self.page_ref = torch.zeros(self.P, dtype=torch.int32, device=dev)
        self.free_stack = torch.arange(self.P - 1, -1, -1, dtype=torch.int64, device=dev)
        self.free_top = self.P  # host mirror: exact after every operation (allocation counts are host ints)
        self.page_table = torch.full((self.NL, self.R + self.K), -1, dtype=torch.int64, device=dev)
        self.kept_len = torch.zeros(self.NL, dtype=torch.int64, device=dev)
        # row NL is spare, like page P: masked ring-decision writes go there
        self.ring_evict = torch.zeros((self.NL + 1, self.w), dtype=torch.bool, device=dev)
        self.seq_len = torch.zeros(self.max_seqs, dtype=torch.int64, device=dev)
        # where decisions are recorded: a separate ring when deferring, so attention and the store
        # see every ring token as kept
        self.ring_mark = torch.zeros_like(self.ring_evict) if self.defers else self.ring_evict
        self.marked_pos = (torch.full(((self.P + 1) * self.ps,), -1, dtype=torch.int32, device=dev)
                           if self.defers else None)
        # deferring: per list, the kept index below which no token is marked (the drops scan from it)
        self.scan_from = torch.zeros(self.NL, dtype=torch.int64, device=dev) if self.defers else None
        self.kept_bound = [0] * self.max_seqs  # host: no list of the slot holds more kept tokens
        self.peak_pages = 0
        self._heads = torch.arange(self.H, device=dev)

    def nbytes(self) -> int:
        """Bytes the pool and its tables take (checked against free memory before allocating)."""
        pool = 2 * (self.P + 1) * self.ps * self.D * self.dtype.itemsize + self.P * (4 + 8)
        tables = self.NL * ((self.R + self.K) * 8 + 8 + self.w) + self.max_seqs * 8
        if self.defers:
            tables += self.NL * (self.w + 8) + (self.P + 1) * self.ps * 4
        return pool + tables

    # ------------------------------------------------------------------ addressing

    def lists(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """List ids ``[B, Hkv]`` of ``layer`` for sequence ``slots`` ``[B]``."""
        return (layer * self.max_seqs + slots)[:, None] * self.H + self._heads[None, :]

    def seq_lists(self, slot: int) -> torch.Tensor:
        """All list ids of one sequence slot, ``[L * Hkv]``."""
        layers = torch.arange(self.L, device=self.device)
        return ((layers * self.max_seqs + slot)[:, None] * self.H + self._heads[None, :]).reshape(-1)

    def flat_slots(self, lists: torch.Tensor, cols: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Flat indices into ``pool.view(-1, D)`` for page-table columns and in-page offsets."""
        pages = torch.gather(self.page_table[lists], -1, cols)
        return pages * self.ps + offs

    # ------------------------------------------------------------------ pages

    @property
    def pages_in_use(self) -> int:
        return self.P - self.free_top

    @property
    def bytes_in_use(self) -> int:
        return self.pages_in_use * self.ps * self.token_bytes

    def _alloc(self, lists: torch.Tensor, cols: torch.Tensor) -> None:
        """Give a fresh page to each ``page_table[lists[i], cols[i]]`` (1-D tensors)."""
        n = int(lists.numel())
        if n == 0:
            return
        if n > self.free_top:
            raise PoolExhausted(f"the KV pool needs {n} more pages, {self.free_top} of {self.P} are free")
        pages = self.free_stack[self.free_top - n : self.free_top]
        self.free_top -= n
        self.page_table[lists, cols] = pages
        self.page_ref[pages] = 1

    def _release(self, pages: torch.Tensor) -> None:
        """Drop one reference to each page of ``pages`` (1-D, may repeat); free those at zero."""
        pages = pages[pages >= 0]
        if pages.numel() == 0:
            return
        self.page_ref.index_put_((pages,), torch.full_like(pages, -1, dtype=torch.int32), accumulate=True)
        uniq = torch.unique(pages)
        freed = uniq[self.page_ref[uniq] == 0]
        n = int(freed.numel())
        self.free_stack[self.free_top : self.free_top + n] = freed
        self.free_top += n

    # ------------------------------------------------------------------ per step

    def reserve(self, lists: torch.Tensor, kept0: torch.Tensor, starts: list[int], n_new: list[int]) -> None:
        """Give every list of the step (``lists`` ``[L, B, H]``, kept lengths ``kept0``) the pages it
        may fill: the ring pages its new positions touch first, and ``ceil(exits / ps)`` kept-store
        pages after its last filled one. The count is the budget's, on the host; nothing syncs."""
        bud, dev = self.budget, self.device
        ring_b, ring_c, kept_b, kept_j = [], [], [], []
        for b, (s, n) in enumerate(zip(starts, n_new)):
            lo, hi = bud.ring_columns(s, n)
            ring_b += [b] * (hi - lo)
            ring_c += range(lo, hi)
            e = bud.kept_columns(s, n)
            kept_b += [b] * e
            kept_j += range(e)
        if not ring_b and not kept_b:
            return
        idx = torch.tensor([ring_b + kept_b, ring_c + kept_j], dtype=torch.int64).to(dev)
        nr = len(ring_b)
        rb, rc, kb, kj = idx[0, :nr], idx[1, :nr], idx[0, nr:], idx[1, nr:]
        first = (kept0 + self.ps - 1) // self.ps  # [L, B, H] first kept column not yet filled
        sel = torch.cat([lists[:, rb, :], lists[:, kb, :]], 1)  # [L, M, H]
        cols = torch.cat([rc[None, :, None].expand(self.L, nr, self.H),
                          self.R + first[:, kb, :] + kj[None, :, None]], 1)
        self._alloc(sel.reshape(-1), cols.reshape(-1))

    def finish_step(self, plan) -> int:
        """After the last layer: return the reserved kept pages nobody filled, advance the rows'
        positions, tighten the host's kept bounds. One sync (two when deferred keys may leave);
        returns the tokens attention read."""
        if self.defers:
            self._drop_marked(plan)
        lists = plan.lists.reshape(-1)
        kcols = self.page_table[lists, self.R :]  # [N, K]
        used = (self.kept_len[lists] + self.ps - 1) // self.ps
        spare = (torch.arange(self.K, device=self.device)[None, :] >= used[:, None]) & (kcols >= 0)
        kept_max = self.kept_len[plan.lists].amax(dim=(0, 2))  # [B]
        n, read, *kmax = torch.cat([spare.sum()[None], plan.tokens_read[None], kept_max]).tolist()
        if n:
            li, ci = spare.nonzero(as_tuple=True)
            pages = kcols[li, ci]
            self.page_ref[pages] = 0  # reserved this step: referenced by this table entry only
            self.free_stack[self.free_top : self.free_top + n] = pages
            self.free_top += n
            self.page_table[lists[li], self.R + ci] = -1
        self.seq_len[plan.slots] += plan.n_new
        for slot, k in zip(plan.slots_host, kmax):
            self.kept_bound[slot] = k
        self.peak_pages = max(self.peak_pages, self.pages_in_use)
        return read

    def _drop_marked(self, plan) -> None:
        """Deferring, after a step's last layer: every sequence of the step that holds more than its
        pool loses its oldest marked keys (position, then layer, then KV head), as many as it holds
        over the pool or as it has; each list fills the holes with its own last kept-store tokens.
        Work in the tokens each list holds from ``scan_from`` on (no marked token sits below it), a
        few syncs; none past the first where no sequence holds more than its pool."""
        n_lists = self.L * self.H
        ends = [s + n for s, n in zip(plan.starts_host, plan.n_new_host)]
        if all(e * n_lists <= self.pool_tokens for e in ends):
            return  # no sequence of the step can hold more than its pool
        dev, ps, bsz = self.device, self.ps, plan.batch
        lists = plan.lists.permute(1, 0, 2).reshape(-1)  # row r = b * N + (layer, KV head)
        kept = self.kept_len[lists]
        held = torch.clamp(plan.starts + plan.n_new, max=self.w) * n_lists + kept.view(bsz, n_lists).sum(1)
        first = self.scan_from[lists]
        span = kept - first  # the tokens that may be marked
        total, over = torch.stack([span.sum(), (held > self.pool_tokens).sum()]).tolist()
        if total == 0 or over == 0:
            return
        rows = torch.arange(bsz * n_lists, device=dev)
        row = torch.repeat_interleave(rows, span, output_size=total)  # every scanned token's row, in order
        idx = first[row] + torch.arange(total, device=dev) - (torch.cumsum(span, 0) - span)[row]  # its kept index
        flat = self.page_table[lists[row], self.R + idx // ps] * ps + idx % ps
        pos = self.marked_pos[flat].long()
        seq = row // n_lists
        marked = (pos >= 0).nonzero().squeeze(1)
        n_marked = torch.bincount(seq[marked], minlength=bsz)
        n_drop = torch.minimum(held - self.pool_tokens, n_marked).clamp(min=0)  # [B]
        # the marked tokens of all sequences in (sequence, position, layer, KV head) order
        key = (seq[marked] * self.max_model_len + pos[marked]) * n_lists + row[marked] % n_lists
        order = torch.sort(key).indices
        owner = seq[marked][order]
        in_seq = torch.arange(order.numel(), device=dev) - (torch.cumsum(n_marked, 0) - n_marked)[owner]
        gone = marked[order[in_seq < n_drop[owner]]]
        drop = torch.zeros(total, dtype=torch.bool, device=dev)
        drop[gone] = True
        left = kept - torch.bincount(row[gone], minlength=bsz * n_lists)
        # a list has as many holes below its new end as surviving tokens at or past it; both come in
        # (row, index) order, so the i-th hole takes the i-th such token
        hole = drop & (idx < left[row])
        dest = flat[hole]
        src = flat[~drop & (idx >= left[row])]
        for store in (self.k_pool.view(-1, self.D), self.v_pool.view(-1, self.D), self.marked_pos):
            store[dest] = store[src]
        self.kept_len[lists] = left
        # from now on no marked token sits below the first hole or the first marked token that stays
        stays = hole | ((pos >= 0) & ~drop & (idx < left[row]))
        self.scan_from[lists] = left.scatter_reduce(0, row[stays], idx[stays], "amin")

    # ------------------------------------------------------------------ per layer (no host work)

    def record_previous_decision(self, lists, starts, prev_evict) -> None:
        """The first logit of a step decides the key at ``starts - 1``, which sits in the ring.

        lists ``[B, H]``, starts ``[B]``, prev_evict ``[B, H]`` bool."""
        slot = torch.remainder(starts - 1, self.w)[:, None].expand_as(lists)
        old = self.ring_mark[lists, slot]
        self.ring_mark[lists, slot] = torch.where((starts >= 1)[:, None], prev_evict, old)

    def record_marks(self, plan, lists, kept0, new_mark) -> None:
        """Deferring: before the store, give every token this step moves to the kept store (all that
        leave the window: positions ``plan.exit_pos``, appended in that order) its position if marked
        (-1 if kept) in ``marked_pos``, and the new tokens that stay in the ring their marks in
        ``ring_mark``. lists/kept0 ``[B, H]``, new_mark ``[B, H, T]`` bool."""
        b, h, t = new_mark.shape
        ps = self.ps
        n_exit = plan.exit_pos.shape[-1]
        if n_exit:
            index = plan.exit_index[:, None, :].expand(b, h, n_exit)
            mark = torch.where(plan.exit_in_ring[:, None, :],
                               torch.gather(self.ring_mark[lists], -1, index.clamp(max=self.w - 1)),
                               torch.gather(new_mark, -1, index.clamp(max=t - 1)))
            dest = kept0[..., None] + torch.arange(n_exit, device=lists.device)
            page = torch.gather(self.page_table[lists], -1, self.R + dest // ps)
            pos = plan.exit_pos[:, None, :]
            flat = torch.where((pos >= 0) & (page >= 0), page * ps + dest % ps, self.trash)
            self.marked_pos[flat.reshape(-1)] = torch.where(mark, pos, -1).to(torch.int32).reshape(-1)
        rows, slot = self._ring_writes(plan, lists, t)
        self.ring_mark[rows, slot] = new_mark

    def _ring_writes(self, plan, lists, t: int):
        """Where a step's new tokens land in the ring: their rows ``[B, H, T]`` (the spare row ``NL``
        where they do not: ``plan.into_ring``) and ring slots ``[B, H, T]``."""
        b, h = lists.shape
        rows = torch.where(plan.into_ring[:, None, :t], lists[..., None], self.NL)
        return rows, plan.new_slot[:, None, :t].expand(b, h, t)

    def leaving_kept(self, plan, lists, new_evict) -> torch.Tensor:
        """``[B, H, w + T]``: which tokens leave the window kept in this step, in position order
        (ring slots in ``plan.ring_order``, then the new chunk). Read before the store writes."""
        b, h, _ = new_evict.shape
        ring_evict = torch.gather(self.ring_evict[lists], -1, plan.ring_order[:, None, :].expand(b, h, self.w))
        return torch.cat([plan.ring_leaving[:, None, :] & ~ring_evict, plan.new_leaving[:, None, :] & ~new_evict], -1)

    def move_torch(self, plan, lists, kept0, keep, k_new, v_new, new_evict) -> None:
        """The store's data movement in torch indexing (the pages are reserved): kept leaving
        tokens appended to the kept store, the new tokens inside the window into their ring slots.
        Masked-out writes go to the spare page / row, so no selection needs the host."""
        b, h, t, d = k_new.shape
        w, ps, R = self.w, self.ps, self.R
        kflat, vflat = self.k_pool.view(-1, d), self.v_pool.view(-1, d)
        table = self.page_table[lists]  # [B, H, R + K]
        ring_slot = plan.ring_order[:, None, :].expand(b, h, w)
        ring_page = torch.gather(table, -1, ring_slot // ps)
        ring_flat = torch.where(ring_page >= 0, ring_page * ps + ring_slot % ps, self.trash)
        src_k = torch.cat([kflat[ring_flat], k_new], 2)  # [B, H, w + T, D]
        src_v = torch.cat([vflat[ring_flat], v_new], 2)
        dest = torch.clamp(kept0[..., None] + torch.cumsum(keep, -1) - 1, min=0)  # kept index of each candidate
        page = torch.gather(table, -1, R + dest // ps)
        flat = torch.where(keep, page * ps + dest % ps, self.trash)
        kflat[flat.reshape(-1)] = src_k.reshape(-1, d)
        vflat[flat.reshape(-1)] = src_v.reshape(-1, d)

        rows, slot = self._ring_writes(plan, lists, t)
        page = torch.gather(table, -1, slot // ps)
        flat = torch.where(plan.into_ring[:, None, :t], page * ps + slot % ps, self.trash)
        kflat[flat.reshape(-1)] = k_new.reshape(-1, d)
        vflat[flat.reshape(-1)] = v_new.reshape(-1, d)
        self.ring_evict[rows, slot] = new_evict

    # ------------------------------------------------------------------ sequences

    def free_seq(self, slot: int) -> None:
        rows = self.seq_lists(slot)
        self._release(self.page_table[rows].reshape(-1))
        self.page_table[rows] = -1
        self.kept_len[rows] = 0
        self.ring_evict[rows] = False
        self.ring_mark[rows] = False
        if self.defers:
            self.scan_from[rows] = 0
        self.seq_len[slot] = 0
        self.kept_bound[slot] = 0

    def fork_pages(self, slot: int) -> int:
        """Upper bound on the pages forking sequence ``slot`` copies (host ints)."""
        if not self.defers:
            return self.budget.fork_pages()
        return self.budget.lists * (self.R + math.ceil(self.kept_bound[slot] / self.ps))

    def fork(self, parent: int, child: int) -> None:
        """The child shares the parent's full kept pages (they are append-only); the pages it will
        write — the ring and a partly filled last kept page — are copied (copy-on-write, eagerly).
        Deferring, kept stores are rewritten when marked keys leave, so every page is copied."""
        src, dst = self.seq_lists(parent), self.seq_lists(child)
        R, ps = self.R, self.ps
        kept = self.kept_len[src]
        full_pages = kept // ps
        cols = torch.arange(self.K, device=self.device)
        shared = (cols[None, :] < full_pages[:, None]) & (not self.defers)  # [N, K]
        table = self.page_table[src]
        self.page_table[dst] = -1
        kept_part = table[:, R:]
        self.page_table[dst, R:] = torch.where(shared, kept_part, torch.full_like(kept_part, -1))
        sp = kept_part[shared]
        self.page_ref.index_put_((sp,), torch.ones_like(sp, dtype=torch.int32), accumulate=True)
        # pages to copy: ring pages that exist, and the partial last kept page
        copy_ring = table[:, :R] >= 0
        li, ci = copy_ring.nonzero(as_tuple=True)
        if self.defers:
            lp, cp = (cols[None, :] < ((kept + ps - 1) // ps)[:, None]).nonzero(as_tuple=True)
        else:
            lp = ((kept % ps) != 0).nonzero(as_tuple=True)[0]
            cp = full_pages[lp]
        all_l = torch.cat([li, lp])
        all_c = torch.cat([ci, R + cp])
        self._alloc(dst[all_l], all_c)
        old = table[all_l, all_c]
        new = self.page_table[dst[all_l], all_c]
        self.k_pool[new] = self.k_pool[old]
        self.v_pool[new] = self.v_pool[old]
        if self.defers:
            marks = self.marked_pos.view(self.P + 1, ps)
            marks[new] = marks[old]
            self.ring_mark[dst] = self.ring_mark[src]
            self.scan_from[dst] = self.scan_from[src]
        self.kept_len[dst] = kept
        self.ring_evict[dst] = self.ring_evict[src]
        self.seq_len[child] = self.seq_len[parent]
        self.kept_bound[child] = self.kept_bound[parent]
        self.peak_pages = max(self.peak_pages, self.pages_in_use)

    def live_tokens(self, slot: int) -> torch.Tensor:
        """Tokens held by each list of a sequence, ``[L, Hkv]`` int64."""
        rows = self.seq_lists(slot)
        ring = torch.clamp(self.seq_len[slot], max=self.w)
        return (ring + self.kept_len[rows]).view(self.L, self.H)

    def check_invariants(self) -> None:
        """Every page is free or referenced exactly as often as page tables name it."""
        used = self.page_table[self.page_table >= 0]
        counts = torch.bincount(used, minlength=self.P)
        if not torch.equal(counts.to(torch.int32), self.page_ref):
            bad = (counts.to(torch.int32) != self.page_ref).nonzero().flatten()[:8].tolist()
            raise AssertionError(f"page reference counts disagree with the page tables at pages {bad}")
        free = self.free_stack[: self.free_top]
        if free.numel() and (self.page_ref[free] != 0).any():
            raise AssertionError("a page on the free stack is still referenced")
        if torch.unique(free).numel() != free.numel():
            raise AssertionError("a page is on the free stack twice")
        if self.free_top + int((self.page_ref > 0).sum()) != self.P:
            raise AssertionError("pages are lost: neither free nor referenced")
        rows = torch.sort(self.page_table, dim=-1).values
        if ((rows[:, 1:] == rows[:, :-1]) & (rows[:, 1:] >= 0)).any():
            raise AssertionError("a list names the same page twice")
        ring = self.page_table[:, : self.R]
        ring = ring[ring >= 0]
        if ring.numel() and (self.page_ref[ring] != 1).any():
            raise AssertionError("a ring page is shared: rings are written every step and must be private")
