"""Which requests run in the next step: admission, chunked prefill, decode, preemption."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..paged.cache import PagedKVCache
from .request import FINISHED, RUNNING, WAITING, Request


@dataclass(slots=True)
class Batch:
    requests: list[Request]
    chunks: list[int]  # tokens each request processes in this step
    prefill: bool


class Scheduler:
    """FIFO admission, prefill-first steps (up to ``prefill_chunk`` prompt tokens), otherwise one
    decode step for every running request. When the pool cannot take a step, the most recently
    arrived running request is preempted (its pages freed, recomputed later)."""

    def __init__(self, cache: PagedKVCache, prefill_chunk: int):
        self.cache = cache
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.free_slots = list(range(cache.max_seqs - 1, -1, -1))
        self.preemptions = 0
        self.hold_admission = False  # set by a preemption, cleared when a request finishes

    # ------------------------------------------------------------------ page arithmetic (host ints)

    def step_pages(self, start: int, n: int) -> int:
        """Upper bound on the pages one sequence allocates processing positions [start, start + n):
        what the cache reserves for it (one :class:`~dms_runtime.paged.budget.PageBudget`)."""
        return self.cache.budget.step_pages(start, n)

    # ------------------------------------------------------------------ queue

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def take_slot(self) -> int | None:
        return self.free_slots.pop() if self.free_slots else None

    def finish(self, req: Request) -> None:
        """Take a request out (finished, failed or aborted, running or waiting), freeing its pages."""
        self.hold_admission = False
        if req.slot is not None:
            self.cache.free_seq(req.slot)
            self.free_slots.append(req.slot)
            req.slot = None
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = FINISHED

    def preempt(self, req: Request) -> None:
        self.cache.free_seq(req.slot)
        self.free_slots.append(req.slot)
        req.slot = None
        req.num_computed = 0
        req.status = WAITING
        req.preemptions += 1
        self.preemptions += 1
        self.hold_admission = True
        self.running.remove(req)
        # back to the front, in arrival order
        self.waiting.appendleft(req)
        self.waiting = deque(sorted(self.waiting, key=lambda r: r.arrival))

    # ------------------------------------------------------------------ the next step

    def _admit(self) -> None:
        """FIFO admission while a slot is free and the pages for the first chunk fit next to one
        decode step of everything running. After a preemption nothing is admitted until a request
        finishes (no thrashing: what was just freed goes to the requests already running)."""
        if self.hold_admission:
            return
        free = self.cache.free_top
        reserve = sum(self.step_pages(r.num_computed, 1) for r in self.running)
        while self.waiting and self.free_slots:
            req = self.waiting[0]
            n = min(req.remaining, self.prefill_chunk)
            need = self.step_pages(0, n)
            if need + reserve > free and self.running:
                break
            self.waiting.popleft()
            req.slot = self.take_slot()
            req.status = RUNNING
            self.running.append(req)
            free -= need
            reserve += self.step_pages(0, 1)

    def schedule(self) -> Batch | None:
        """The next step: prefill chunks if any request has prompt left (chunks shrink to the free
        pages), else one decode step for all; the latest arrivals are preempted when even that
        cannot fit. The oldest running request always runs, so every request finishes."""
        self._admit()
        if not self.running:
            return None
        free = self.cache.free_top
        prefilling = sorted((r for r in self.running if r.prefilling), key=lambda r: r.arrival)
        if prefilling:
            reqs, chunks, budget = [], [], self.prefill_chunk
            for r in prefilling:
                n = min(r.remaining, budget)
                while n > 0 and self.step_pages(r.num_computed, n) > free:
                    n //= 2
                if n == 0:
                    continue
                reqs.append(r)
                chunks.append(n)
                budget -= n
                free -= self.step_pages(r.num_computed, n)
                if budget == 0:
                    break
            if reqs:
                return Batch(reqs, chunks, prefill=True)
        while True:
            decoding = [r for r in self.running if not r.prefilling]
            need = sum(self.step_pages(r.num_computed, 1) for r in decoding)
            if decoding and need <= self.cache.free_top:
                return Batch(decoding, [1] * len(decoding), prefill=False)
            oldest = min(self.running, key=lambda r: r.arrival)
            if len(self.running) == 1:
                # alone, a request fits by construction (add_request checked its worst case)
                n = 1 if not oldest.prefilling else min(oldest.remaining, self.prefill_chunk)
                return Batch([oldest], [n], prefill=oldest.prefilling)
            self.preempt(max((r for r in self.running if r is not oldest), key=lambda r: r.arrival))
