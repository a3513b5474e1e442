"""The serving engine: requests in, one model step at a time, tokens out."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .. import validation as V
from ..models.decoder import DecoderLM
from ..outputs import RequestOutput, StopChecker, non_finite_error
from ..paged.backends import resolve
from ..paged.cache import PagedConfig, PagedKVCache
from ..sampling import SamplingParams
from .request import FINISHED, RUNNING, WAITING, Request
from .runner import ModelRunner
from .scheduler import Scheduler


@dataclass(slots=True)
class StepOutput:
    request_id: int
    token: int | None  # None when the request ended without a token (finish_reason "abort" or "error")
    finished: bool
    finish_reason: str | None


@dataclass(slots=True)
class EngineStats:
    steps: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0
    kv_bytes_read: int = 0  # bytes of K/V read by attention from the cache
    kv_bytes_read_dense: int = 0  # what a dense cache of the same positions would read
    decode_kv_bytes_read: int = 0  # the part of kv_bytes_read read by decode steps
    peak_dense_bytes: int = 0  # the largest dense cache the running sequences would need
    kernels: dict[str, str] = field(default_factory=dict)  # op -> what ran it (projection, prefill, decode, store)


class Engine:
    """Continuous batching over a paged DMS cache.

    ``add_request(prompt_ids, params, n=1)`` returns the ids of its ``n`` samples (the samples
    share the prompt's pages); ``step()`` runs one forward pass and returns the tokens it made;
    ``stream()`` iterates over all tokens until every request has finished; ``outputs`` holds
    the finished requests.

    With a model loaded with ``tensor_parallel=N`` this engine runs on rank 0 and drives the other
    ranks (which call ``dms_runtime.parallel.run_follower``); its pool holds rank 0's KV heads.
    """

    def __init__(self, model: DecoderLM, config: PagedConfig | None = None, *, eos_ids: set[int] | None = None,
                 tokenizer=None, tensor_parallel: int | None = None):
        self.model = model
        if config is not None and not isinstance(config, PagedConfig):
            raise V.SettingTypeError(f"config: expected a PagedConfig, got {type(config).__name__}")
        self.config = config or PagedConfig()
        self.config.validate()  # settings changed after creation are checked before they size anything
        cfg = model.config
        if cfg.dms is not None:
            cfg.dms.validate()
        max_len = self.config.max_model_len or cfg.max_position_embeddings
        self.cache = PagedKVCache(cfg, self.config, model.dtype, model.device, max_len)
        self.scheduler = Scheduler(self.cache, self.config.prefill_chunk)
        # the kernel set, resolved once ("auto" included); the runner runs every step with it
        self.runner = ModelRunner(model, self.cache, resolve(self.config.attention, model.device))
        self.eos_ids = set(eos_ids or cfg.eos_token_ids)
        self.tokenizer = tokenizer
        self.requests: dict[int, Request] = {}
        self.outputs: dict[int, RequestOutput] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        if getattr(model, "tp", None) is not None or tensor_parallel not in (None, 1):
            if self.cache.defers:
                raise ValueError(f"defer_budget={self.config.defer_budget}: deferred eviction ranks the marked keys "
                                 "of all KV heads of a sequence together; with tensor parallelism each rank holds "
                                 "some heads, so give defer_budget=0")
            from ..parallel.engine import attach  # rank 0 of a sharded model: send each decision to every rank

            attach(self, tensor_parallel)

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None, n: int = 1) -> list[int]:
        """Queue a prompt; returns the ids of its ``n`` samples. Sample ``i`` of the engine (ids
        count from 0) draws from a generator seeded ``params.seed + i``."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise V.SettingTypeError(f"params: expected a SamplingParams, got {type(params).__name__}")
        params.validate()  # the same checks as generate(), also after a field was changed
        n = V.integer("n", n, 1, V.MAX_SAMPLES)
        prompt_ids = V.token_ids("prompt_ids", prompt_ids, self.model.config.vocab_size)
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.cache.max_model_len:
            raise ValueError(f"prompt_ids: {len(prompt_ids)} prompt tokens + max_new_tokens={params.max_new_tokens} "
                             f"exceed max_model_len={self.cache.max_model_len}")
        worst = self.cache.budget.worst_case_pages(total)
        if worst > self.cache.P:
            raise ValueError(
                f"request: {total} tokens may need up to {worst} pages (nothing evicted), but the whole pool has "
                f"{self.cache.P} pages of {self.cache.ps} tokens; give the engine more kv_memory_bytes or num_pages"
            )
        stops = StopChecker(params, self.eos_ids, self.tokenizer)
        reqs = []
        for j in range(n):
            rid = next(self._ids)
            gen = None
            if not params.greedy:
                gen = torch.Generator(device="cpu")
                if params.seed is None:
                    gen.seed()
                else:
                    gen.manual_seed(params.seed + rid)
            reqs.append(Request(rid, list(prompt_ids), params, stops, gen, next(self._arrivals)))
        parent = reqs[0]
        parent.pending_forks = reqs[1:]
        for r in reqs:
            self.requests[r.id] = r
        self.scheduler.add(parent)
        return [r.id for r in reqs]

    @property
    def attention_name(self) -> str:
        """The kernel set this engine runs (``PagedConfig.attention`` resolved)."""
        return self.runner.kernels.name

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ stepping

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One forward pass. Request state advances only once the pass has succeeded: a forward
        that raises finishes the batch's requests with finish_reason "error" (their pages
        freed); a request whose logits are not finite, or whose sampling fails, finishes the
        same way, and the others go on."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        t0 = time.perf_counter()
        reqs, chunks = batch.requests, batch.chunks
        try:
            result = self.runner.run(reqs, chunks)
        except Exception as exc:  # the cache may hold part of this step: these requests end here
            return [self._finish(req, "error", exc) for r in reqs for req in [r] + self._drop_forks(r)]
        logits, finite, read = result.logits, result.finite, result.kv_bytes_read

        st = self.stats
        st.kernels = self.runner.report()
        st.kv_bytes_read += read
        st.kv_bytes_read_dense += sum(r.num_computed for r in reqs) * self.cache.L * self.cache.H * self.cache.token_bytes
        for r, n in zip(reqs, chunks):
            r.num_computed += n
        dense_now = sum(r.num_computed for r in self.scheduler.running) * self.cache.L * self.cache.H * self.cache.token_bytes
        st.peak_dense_bytes = max(st.peak_dense_bytes, dense_now)

        out: list[StepOutput] = []
        for i, r in enumerate(reqs):
            if r.remaining != 0:
                continue
            if not finite[i]:
                err = non_finite_error(len(r.generated), [r.id], "requests")
                out += [self._finish(req, "error", err) for req in [r] + self._drop_forks(r)]
                continue
            for req in [r] + self._fork_pending(r):  # forked samples draw from the same logits
                out.append(self._sample(req, logits[i]))

        st.steps += 1
        dt = time.perf_counter() - t0
        if batch.prefill:
            st.prefill_steps += 1
            st.prefill_s += dt
        else:
            st.decode_steps += 1
            st.decode_s += dt
            st.decode_kv_bytes_read += read
            st.decode_tokens += len(reqs)
        return out

    def abort(self, request_id: int) -> bool:
        """End a request now (finish_reason "abort"), freeing its pages and slot. False when the
        id is unknown or the request has already finished."""
        req = self.requests.get(request_id)
        if req is None or req.status == FINISHED:
            return False
        for parent in self.scheduler.running + list(self.scheduler.waiting):
            if req in parent.pending_forks:  # a sample not forked yet
                parent.pending_forks.remove(req)
                break
        else:
            # samples still waiting for this prompt's prefill now prefill on their own
            for child in self._drop_forks(req):
                self.scheduler.add(child)
        self._finish(req, "abort")
        return True

    def _drop_forks(self, parent: Request) -> list[Request]:
        forks, parent.pending_forks = parent.pending_forks, []
        return forks

    def _finish(self, req: Request, reason: str, error: Exception | None = None) -> StepOutput:
        """Record the output, free the request's pages and slot, and report it finished."""
        try:
            text = req.stops.text(req.generated)
        except Exception as exc:  # a tokenizer that cannot decode ends this request, not the step
            text, reason, error = None, "error", error or exc
        req.finish_reason = reason
        req.live_tokens = self.cache.live_tokens(req.slot).tolist() if req.slot is not None else None
        self.scheduler.finish(req)
        self.outputs[req.id] = RequestOutput(
            prompt_token_ids=req.prompt_ids, token_ids=req.generated, text=text,
            finish_reason=reason, live_tokens=req.live_tokens, error=error)
        return StepOutput(req.id, None if reason in ("abort", "error") else req.tokens[-1], True, reason)

    def _fork_pending(self, parent: Request) -> list[Request]:
        """Give the parent's pages to its other samples; one without a slot or pages prefills alone later."""
        sch, made = self.scheduler, []
        for child in parent.pending_forks:
            child.tokens = list(parent.tokens)
            if sch.free_slots and self.cache.fork_pages(parent.slot) <= self.cache.free_top:
                child.slot = sch.take_slot()
                self.cache.fork(parent.slot, child.slot)
                child.num_computed = parent.num_computed
                child.status = RUNNING
                sch.running.append(child)
                made.append(child)
            else:
                sch.add(child)
        parent.pending_forks = []
        return made

    def _sample(self, req: Request, logits_row: torch.Tensor) -> StepOutput:
        try:
            token = self.runner.sample(req, logits_row)
            reason = req.stops.check(req.generated + [token])
        except Exception as exc:
            return self._finish(req, "error", exc)
        req.tokens.append(token)
        if reason is not None:
            return self._finish(req, reason)
        return StepOutput(req.id, token, False, None)

    def stream(self) -> Iterator[StepOutput]:
        while self.has_unfinished():
            yield from self.step()

    def run(self) -> dict[int, RequestOutput]:
        for _ in self.stream():
            pass
        return self.outputs
