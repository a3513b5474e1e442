"""Which requests run in the next step: admission, chunked prefill, decode, preemption."""

from __future__ import annotations

import math
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

    # ------------------------------------------------------------------ page arithmetic (host ints)

    def step_pages(self, start: int, n: int) -> int:
        """Upper bound on the pages one sequence allocates processing positions [start, start + n)."""
        c = self.cache
        w, ps = c.w, c.ps
        ring = math.ceil(min(start + n, w) / ps) - math.ceil(min(start, w) / ps)
        exits = max(0, start + n - w) - max(0, start - w)
        return c.L * c.H * (ring + math.ceil(exits / ps))

    def worst_case_pages(self, total_tokens: int) -> int:
        """Pages a sequence of ``total_tokens`` positions holds if nothing is ever evicted."""
        c = self.cache
        return c.L * c.H * (math.ceil(min(total_tokens, c.w) / c.ps) + math.ceil(max(0, total_tokens - c.w) / c.ps) + 1)

    def fork_pages(self) -> int:
        c = self.cache
        return c.L * c.H * (c.R + 1)

    # ------------------------------------------------------------------ queue

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def take_slot(self) -> int | None:
        return self.free_slots.pop() if self.free_slots else None

    def finish(self, req: Request) -> None:
        req.status = FINISHED
        self.cache.free_seq(req.slot)
        self.free_slots.append(req.slot)
        req.slot = None
        self.running.remove(req)

    def preempt(self, req: Request) -> None:
        self.cache.free_seq(req.slot)
        self.free_slots.append(req.slot)
        req.slot = None
        req.num_computed = 0
        req.status = WAITING
        req.preemptions += 1
        self.preemptions += 1
        self.running.remove(req)
        # back to the front, in arrival order
        self.waiting.appendleft(req)
        self.waiting = deque(sorted(self.waiting, key=lambda r: r.arrival))

    # ------------------------------------------------------------------ the next step

    def _admit(self) -> None:
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
        self._admit()
        if not self.running:
            return None
        prefilling = [r for r in self.running if r.prefilling]
        if prefilling:
            reqs, chunks, budget = [], [], self.prefill_chunk
            for r in sorted(prefilling, key=lambda r: r.arrival):
                if budget == 0:
                    break
                n = min(r.remaining, budget)
                reqs.append(r)
                chunks.append(n)
                budget -= n
            batch = Batch(reqs, chunks, prefill=True)
        else:
            batch = Batch(list(self.running), [1] * len(self.running), prefill=False)
        return self._fit(batch)

    def _fit(self, batch: Batch) -> Batch | None:
        """Preempt the latest arrivals until the step's pages are sure to be there."""
        while True:
            need = sum(self.step_pages(r.num_computed, n) for r, n in zip(batch.requests, batch.chunks))
            if need <= self.cache.free_top or len(self.running) <= 1:
                return batch
            victim = max(self.running, key=lambda r: r.arrival)
            if victim in batch.requests and len(batch.requests) == 1 and len(self.running) > 1:
                victim = max((r for r in self.running if r is not victim), key=lambda r: r.arrival)
            if victim in batch.requests:
                i = batch.requests.index(victim)
                del batch.requests[i], batch.chunks[i]
            self.preempt(victim)
            if not batch.requests:
                return self.schedule()
