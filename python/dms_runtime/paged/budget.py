"""The page arithmetic of the paged cache, in one place: what a step, a fork or a whole sequence
may allocate. The scheduler plans batches against it and the cache reserves a step's pages with
it, so the two can never disagree."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PageBudget:
    """Page counts of one sequence's ``layers * kv_heads`` lists (host ints, no device work).

    window: the ring size ``w`` (the DMS window, or one page for a model without eviction);
    page_size: tokens per page.
    """

    layers: int
    kv_heads: int
    window: int
    page_size: int

    @property
    def ring_pages(self) -> int:
        """``R``: pages of one list's ring."""
        return math.ceil(self.window / self.page_size)

    @property
    def lists(self) -> int:
        """Lists of one sequence."""
        return self.layers * self.kv_heads

    def ring_columns(self, start: int, n: int) -> tuple[int, int]:
        """Ring page columns ``[lo, hi)`` a step over positions ``[start, start + n)`` writes for
        the first time (slot ``r`` of position ``p`` is ``p % w``; slots fill in order from 0)."""
        w, ps = self.window, self.page_size
        return math.ceil(min(start, w) / ps), math.ceil(min(start + n, w) / ps)

    def exits(self, start: int, n: int) -> int:
        """Tokens that leave the window in a step over ``[start, start + n)``."""
        w = self.window
        return max(0, start + n - w) - max(0, start - w)

    def kept_columns(self, start: int, n: int) -> int:
        """Upper bound on the kept-store pages one list adds in the step: ``ceil(exits / ps)``
        (``ceil((k + e) / ps) - ceil(k / ps) <= ceil(e / ps)`` for any ``k`` already kept)."""
        return math.ceil(self.exits(start, n) / self.page_size)

    def list_step_pages(self, start: int, n: int) -> int:
        lo, hi = self.ring_columns(start, n)
        return hi - lo + self.kept_columns(start, n)

    def step_pages(self, start: int, n: int) -> int:
        """Upper bound on the pages one sequence allocates processing positions [start, start + n)."""
        return self.lists * self.list_step_pages(start, n)

    def worst_case_pages(self, total_tokens: int) -> int:
        """Pages one sequence of ``total_tokens`` positions holds if nothing is ever evicted: its
        ring, its kept store, and one partly filled page of slack."""
        ps = self.page_size
        ring = math.ceil(min(total_tokens, self.window) / ps)
        kept = math.ceil(max(0, total_tokens - self.window) / ps)
        return self.lists * (ring + kept + 1)

    def fork_pages(self) -> int:
        """Pages a fork copies: every ring page and a partly filled last kept page, per list."""
        return self.lists * (self.ring_pages + 1)

    def kept_bound(self, start: int, n: int, kept_max: int) -> int:
        """Upper bound on any list's kept tokens after the step, given the bound before it."""
        return kept_max + self.exits(start, n)
