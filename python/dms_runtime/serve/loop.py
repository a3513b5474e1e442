"""One background thread that owns the engine and steps it for every connection.

HTTP handlers never touch the engine: they post commands (add, abort) to this loop and read
their tokens from an asyncio queue per submission. Between two engine steps the loop takes the
posted commands, so new requests join the running batch (continuous batching) and an abort frees
its pages before the next step. The loop sleeps when there is no work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..engine import Engine
from ..parallel.engine import keepalive
from ..sampling import SamplingParams
from .metrics import ServerMetrics

KEEPALIVE_S = 30.0  # an idle tensor-parallel server pings its followers this often

log = logging.getLogger("dms.serve")


@dataclass(slots=True)
class Event:
    """One token (or the end) of one sequence of a submission."""

    index: int  # the choice index within the submission
    token: int | None
    finished: bool
    finish_reason: str | None = None
    text: str | None = None  # the final text (stop strings cut) when finished
    live_tokens: int = 0  # KV tokens the cache held for the sequence when it finished
    dense_tokens: int = 0  # what a dense cache holds for the same positions
    error: str | None = None


@dataclass(slots=True, eq=False)
class Submission:
    """The sequences of one HTTP request: ``n`` samples of each prompt; choice ``i * n + j``."""

    prompts: list[list[int]]
    params: SamplingParams
    n: int
    queue: asyncio.Queue
    aloop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.perf_counter)
    ids: dict[int, int] = field(default_factory=dict)  # engine request id -> choice index (loop thread)
    last: dict[int, float] = field(default_factory=dict)  # request id -> time of its last token
    open: int = 0  # sequences not finished yet (loop thread)

    @property
    def size(self) -> int:
        return len(self.prompts) * self.n


class EngineLoop:
    def __init__(self, engine: Engine, metrics: ServerMetrics, *, max_waiting: int):
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.capacity = engine.cache.max_seqs + max_waiting  # sequences admitted to the server at once
        self.in_flight = 0  # sequences of submissions not yet done (event-loop side only)
        self._cmds: deque = deque()
        self._wake = threading.Event()
        self._stop = False
        self._last_ping = time.perf_counter()
        self._routes: dict[int, Submission] = {}  # engine request id -> its submission (loop thread)
        self._thread = threading.Thread(target=self._run, name="dms-engine-loop", daemon=True)
        self.failure: BaseException | None = None
        self._wrap_scheduler()

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    async def submit(self, prompts: list[list[int]], params: SamplingParams, n: int) -> Submission:
        """Queue the prompts (``n`` samples each); raises ValueError when the engine refuses them."""
        sub = Submission(prompts, params, n, asyncio.Queue(), asyncio.get_running_loop())
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._post(("add", sub, done))
        await asyncio.wrap_future(done)
        return sub

    def abort(self, sub: Submission) -> None:
        """End every sequence of ``sub`` still running; their pages are freed before the next step."""
        self._post(("abort", sub, None))

    def _post(self, cmd) -> None:
        self._cmds.append(cmd)
        self._wake.set()

    # ------------------------------------------------------------------ loop thread

    def _wrap_scheduler(self) -> None:
        """Count the prompt tokens that go through the model (samples that share a prompt's
        pages do not recompute it) and the steps."""
        sched = self.engine.scheduler
        schedule = sched.schedule

        def counted():
            batch = schedule()
            if batch is not None:
                self.metrics.steps.inc()
                if batch.prefill:
                    self.metrics.prefill_tokens.inc(sum(batch.chunks))
            return batch

        sched.schedule = counted

    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stop:
                self._drain()
                if eng.has_unfinished():
                    preempted = eng.scheduler.preemptions
                    outs = eng.step()
                    self.metrics.preemptions.inc(eng.scheduler.preemptions - preempted)
                    self._gauges()  # before the tokens go out: a client that saw its last token sees its pages freed
                    now = time.perf_counter()
                    for out in outs:
                        self._deliver(out.request_id, out.token, out.finished, out.finish_reason, now)
                else:
                    self._gauges()
                    self._wake.wait(1.0)
                    self._wake.clear()
                    if time.perf_counter() - self._last_ping > KEEPALIVE_S:  # tensor parallel: followers wait on us
                        keepalive(eng)
                        self._last_ping = time.perf_counter()
        except BaseException as exc:  # the engine is unusable: end every open request with the cause
            log.exception("engine loop failed")
            self.failure = exc
            for rid in list(self._routes):
                self._deliver(rid, None, True, "error", time.perf_counter(), error=f"engine loop failed: {exc}")

    def _drain(self) -> None:
        while self._cmds:
            kind, sub, done = self._cmds.popleft()
            if kind == "add":
                try:
                    for i, prompt in enumerate(sub.prompts):
                        ids = self.engine.add_request(prompt, sub.params, n=sub.n)
                        for j, rid in enumerate(ids):
                            # seeds per sample of this request, whatever else the server runs
                            gen = self.engine.requests[rid].generator
                            if gen is not None and sub.params.seed is not None:
                                gen.manual_seed(sub.params.seed + i * sub.n + j)
                            sub.ids[rid] = i * sub.n + j
                            self._routes[rid] = sub
                            sub.open += 1
                except Exception as exc:
                    for rid in list(sub.ids):
                        self._abort(rid)
                    done.set_exception(exc)
                else:
                    done.set_result(None)
            elif kind == "abort":
                for rid in [r for r, s in self._routes.items() if s is sub]:
                    self._abort(rid)

    def _abort(self, rid: int) -> None:
        self.engine.abort(rid)
        self._forget(rid, "abort")

    def _forget(self, rid: int, reason: str):
        self._routes.pop(rid, None)
        self.engine.requests.pop(rid, None)
        self.metrics.finished.labels(reason=reason).inc()
        return self.engine.outputs.pop(rid, None)

    def _deliver(self, rid: int, token: int | None, finished: bool, reason: str | None, now: float,
                 error: str | None = None) -> None:
        sub = self._routes.get(rid)
        if sub is None:
            return
        m = self.metrics
        ev = Event(sub.ids[rid], token, finished, reason)
        if token is not None:
            m.generation_tokens.inc()
            last = sub.last.get(rid)
            if last is None:
                m.ttft.observe(now - sub.arrival)
            else:
                m.itl.observe(now - last)
            sub.last[rid] = now
        if finished:
            out = self._forget(rid, reason or "error")
            sub.open -= 1
            if out is not None:
                cfg = self.engine.model.config
                ev.text = out.text
                ev.live_tokens = int(sum(map(sum, out.live_tokens))) if out.live_tokens else 0
                cached = len(out.prompt_token_ids) + len(out.token_ids) - (0 if token is None else 1)
                ev.dense_tokens = cfg.num_layers * cfg.num_kv_heads * cached
                if out.error is not None:
                    error = f"{type(out.error).__name__}: {out.error}"
            ev.error = error
            if sub.open == 0:
                m.request_latency.observe(now - sub.arrival)
        try:
            sub.aloop.call_soon_threadsafe(sub.queue.put_nowait, ev)
        except RuntimeError:  # the event loop has closed (shutdown)
            pass

    def _gauges(self) -> None:
        eng, m = self.engine, self.metrics
        cache, sched = eng.cache, eng.scheduler
        m.running.set(len(sched.running))
        m.waiting.set(len(sched.waiting) + sum(len(r.pending_forks) for r in sched.waiting))
        m.pages_used.set(cache.pages_in_use)
        m.pages_free.set(cache.free_top)
        slots = [r.slot for r in sched.running if r.slot is not None]
        if slots:
            idx = torch.tensor(slots, device=cache.device)
            seq = cache.seq_len[idx]
            kept = cache.kept_len.view(cache.L, cache.max_seqs, cache.H)[:, idx]
            live = int(torch.clamp(seq, max=cache.w).sum()) * cache.L * cache.H + int(kept.sum())
            dense = int(seq.sum()) * cache.L * cache.H
        else:
            live = dense = 0
        m.live_tokens.set(live)
        m.dense_tokens.set(dense)

    def occupancy(self) -> dict:
        """Pool and queue state (read from another thread: a consistent-enough snapshot)."""
        cache, sched = self.engine.cache, self.engine.scheduler
        return {"pages_total": cache.P, "pages_used": cache.pages_in_use, "pages_free": cache.free_top,
                "running": len(sched.running), "waiting": len(sched.waiting), "in_flight": self.in_flight}
