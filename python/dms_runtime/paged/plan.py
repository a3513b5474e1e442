"""The plan of one engine step, built once before the first layer and read by every layer.

Everything a layer needs that does not depend on the layer's own data lives here: the rows'
slots, first positions and new-token counts, the list ids and page tables of every layer (the
step's pages are reserved before the first layer, so the tables do not change inside the step),
the kept lengths before the step, the ring positions and which tokens leave the window, and the
host-side bounds the kernels size their launches with (the longest list, the longest kept store).
The bounds come from host bookkeeping (the scheduler's positions and the cache's per-slot kept
bound), never from reading a device tensor, so nothing inside the layer loop waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def ring_positions(starts: torch.Tensor, window: int) -> torch.Tensor:
    """Position held by each ring slot before a step that starts at ``starts`` ``[B]``:
    ``[B, w]``, -1 where the slot holds nothing yet (slot ``r`` holds the latest ``p < start``
    with ``p % w == r``)."""
    r = torch.arange(window, device=starts.device)
    last = (starts - 1)[:, None]
    pos = last - torch.remainder(last - r[None, :], window)
    return torch.where(pos >= 0, pos, torch.full_like(pos, -1))


@dataclass(slots=True)
class StepPlan:
    """One step over rows ``b`` with new positions ``[starts[b], starts[b] + n_new[b])``.

    Device tensors (B rows, L layers, H KV heads, w window, T = max new tokens):
    slots/starts/n_new ``[B]``; lists ``[L, B, H]`` list ids; tables ``[L, B, H, R + K]`` page ids
    (after the step's reservation); kept0 ``[L, B, H]`` kept tokens before the step; n_ring ``[B]``
    ring tokens held before the step; ring_order ``[B, w]`` ring slots in position order (empty
    slots last); ring_leaving ``[B, w]`` (in that order) and new_leaving ``[B, T]``: tokens that
    leave the window in this step; into_ring ``[B, T]`` the new tokens written to the ring (padding
    and tokens that leave within the step are not) and new_slot ``[B, T]`` their ring slots; deferring
    only (else ``[B, 0]``): exit_pos ``[B, E]`` the positions leaving the window, in order (-1 past a
    row's own; E: the most of any row), exit_in_ring ``[B, E]`` whether each sits in the ring (else in
    the new chunk), exit_index ``[B, E]`` its ring slot or chunk index; tokens_read a device counter of
    the K/V tokens attention read.

    Host ints: t, decode (t == 1), kept_max (no list of the step holds more kept tokens) and
    max_tokens (no list holds more tokens before the step: ring + kept).
    """

    slots: torch.Tensor
    starts: torch.Tensor
    n_new: torch.Tensor
    lists: torch.Tensor
    tables: torch.Tensor
    kept0: torch.Tensor
    n_ring: torch.Tensor
    ring_order: torch.Tensor
    exit_pos: torch.Tensor
    exit_in_ring: torch.Tensor
    exit_index: torch.Tensor
    into_ring: torch.Tensor
    new_slot: torch.Tensor
    ring_leaving: torch.Tensor
    new_leaving: torch.Tensor
    tokens_read: torch.Tensor
    slots_host: list[int]
    starts_host: list[int]
    n_new_host: list[int]
    t: int
    kept_max: int
    max_tokens: int

    @property
    def decode(self) -> bool:
        return self.t == 1

    @property
    def batch(self) -> int:
        return len(self.slots_host)

    @classmethod
    def build(cls, cache, slots: list[int], starts: list[int], n_new: list[int]) -> "StepPlan":
        """Reserve the step's pages in ``cache`` (worst case, for every layer at once) and plan it."""
        if not (len(slots) == len(starts) == len(n_new)) or not slots:
            raise ValueError("slots/starts/n_new: expected equally long non-empty lists")
        dev, w = cache.device, cache.w
        host = torch.tensor([slots, starts, n_new], dtype=torch.int64)
        slots_t, starts_t, n_new_t = host.to(dev).unbind(0)  # one copy to the device
        t = max(n_new)
        layers = torch.arange(cache.L, device=dev)
        lists = ((layers[:, None] * cache.max_seqs + slots_t[None, :])[..., None] * cache.H
                 + torch.arange(cache.H, device=dev))  # [L, B, H]
        kept0 = cache.kept_len[lists]
        cache.reserve(lists, kept0, starts, n_new)
        tables = cache.page_table[lists]

        ring_pos = ring_positions(starts_t, w)
        order = torch.argsort(torch.where(ring_pos < 0, ring_pos.new_full((), 1 << 62), ring_pos), dim=-1)
        ring_sorted = torch.gather(ring_pos, -1, order)
        cut = (starts_t + n_new_t - w)[:, None]  # positions < cut leave the window
        a = torch.arange(t, device=dev)
        new_pos = starts_t[:, None] + a[None, :]
        lo = torch.clamp(starts_t - w, min=0)
        e = torch.arange(max(cache.budget.exits(s, n) for s, n in zip(starts, n_new)) if cache.defers else 0,
                         device=dev)
        exit_pos = torch.where(lo[:, None] + e[None, :] < torch.clamp(cut, min=0), lo[:, None] + e[None, :], -1)
        exit_in_ring = exit_pos < starts_t[:, None]
        exit_index = torch.where(exit_in_ring, torch.remainder(exit_pos, w),
                                 (exit_pos - starts_t[:, None]).clamp(0, t - 1))
        kept_max = min(max(cache.kept_bound[s] for s in slots), cache.K * cache.ps)
        max_tokens = max(min(s, w) for s in starts) + kept_max
        for s, st, n in zip(slots, starts, n_new):
            cache.kept_bound[s] = cache.budget.kept_bound(st, n, cache.kept_bound[s])
        return cls(
            slots=slots_t, starts=starts_t, n_new=n_new_t, lists=lists, tables=tables, kept0=kept0,
            n_ring=torch.clamp(starts_t, max=w), ring_order=order, exit_pos=exit_pos, exit_in_ring=exit_in_ring,
            exit_index=exit_index, into_ring=(a[None, :] < n_new_t[:, None]) & (new_pos >= cut),
            new_slot=torch.remainder(new_pos, w),
            ring_leaving=(ring_sorted >= 0) & (ring_sorted < cut),
            new_leaving=(a[None, :] < n_new_t[:, None]) & (new_pos < cut),
            tokens_read=torch.zeros((), dtype=torch.int64, device=dev),
            slots_host=list(slots), starts_host=list(starts), n_new_host=list(n_new), t=t, kept_max=kept_max,
            max_tokens=max_tokens,
        )
