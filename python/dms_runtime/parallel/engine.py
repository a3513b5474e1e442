"""The engine across ranks: rank 0 schedules and samples, every rank runs its shard of the model.

Rank 0 holds an ordinary :class:`~dms_runtime.engine.Engine` (``add_request`` / ``step`` /
``stream`` / ``abort``). :func:`attach` gives it two stand-ins that forward every decision to the
other ranks on the control group, in the order rank 0 takes it:

* the cache (``engine.cache`` and ``engine.scheduler.cache``): ``free_seq`` (finish, abort,
  preemption) and ``fork`` are sent before rank 0 runs them; ``live_tokens`` gathers every rank's
  heads; ``free_top``, which the scheduler budgets pages with, is the *smallest* number of free
  pages of any rank (heads evict at different rates, so the pools fill unevenly), refreshed by one
  all-reduce after every operation that allocates or frees pages;
* the model: a forward sends the step (token ids, positions, sequence slots, starts, chunk
  lengths, the logits column) before running it; every rank builds the same step plan from
  them (its own pages reserved) and closes the step with ``finish_step``, after which the free
  pages are counted again.

The other ranks run :func:`run_follower`: receive an operation, apply it to their own pool and
model shard, repeat until rank 0 sends ``shutdown``. Sampling, stop checks and the request
queue exist on rank 0 only; the followers need none of them.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist

from ..paged.backends import resolve
from ..paged.cache import PagedKVCache
from ..paged.plan import StepPlan
from ..paged.step import PagedStep
from .shard import TPShard


class RankZeroFailed(RuntimeError):
    """Raised on the other ranks when rank 0's ``generate()`` call failed (rank 0 raises the cause)."""


def _send(shard: TPShard, msg: tuple) -> None:
    dist.broadcast_object_list([msg], src=0, group=shard.tp.ctrl)


def _recv(shard: TPShard) -> tuple:
    box = [None]
    dist.broadcast_object_list(box, src=0, group=shard.tp.ctrl)
    return box[0]


def _min_free(shard: TPShard, cache: PagedKVCache) -> int:
    t = torch.tensor([cache.free_top], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=shard.tp.ctrl)
    return int(t)


def _gather_live(shard: TPShard, cache: PagedKVCache, slot: int) -> torch.Tensor:
    local = cache.live_tokens(slot).cpu()  # [L, Hkv/N]
    parts = [torch.empty_like(local) for _ in range(shard.size)]
    dist.all_gather(parts, local, group=shard.tp.ctrl)
    return torch.cat(parts, dim=1)  # [L, Hkv]: rank r holds heads [r*Hkv/N, (r+1)*Hkv/N)


def _pool_stats(shard: TPShard, cache: PagedKVCache) -> list[dict]:
    mine = {"rank": shard.rank, "kv_heads": cache.H, "num_pages": cache.P, "pages_in_use": cache.pages_in_use,
            "peak_pages": cache.peak_pages, "bytes_in_use": cache.bytes_in_use,
            "peak_bytes": cache.peak_pages * cache.ps * cache.token_bytes,
            "pool_bytes": cache.P * cache.ps * cache.token_bytes}
    out: list = [None] * shard.size
    dist.all_gather_object(out, mine, group=shard.tp.ctrl)
    return out


class ShardedCacheView:
    """Rank 0's cache as the scheduler and engine see it (everything else passes through)."""

    def __init__(self, cache: PagedKVCache, shard: TPShard):
        self.__dict__["_cache"] = cache
        self.__dict__["_shard"] = shard
        self.__dict__["_free"] = cache.free_top  # every pool starts with the same number of pages

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_cache"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["_cache"], name, value)

    @property
    def free_top(self) -> int:
        """Free pages of the fullest rank: a step that fits here fits on every rank."""
        return min(self._free, self._cache.free_top)

    def send(self, msg: tuple) -> None:
        if self._shard.driver is not self:
            raise RuntimeError("this tensor-parallel engine was replaced by a newer Engine on the same model; "
                               "the other ranks follow one engine at a time")
        _send(self._shard, msg)

    def sync_free(self) -> None:
        self.__dict__["_free"] = _min_free(self._shard, self._cache)

    def free_seq(self, slot: int) -> None:
        self.send(("free", slot))
        self._cache.free_seq(slot)
        self.sync_free()

    def fork(self, parent: int, child: int) -> None:
        self.send(("fork", parent, child))
        self._cache.fork(parent, child)
        self.sync_free()

    def finish_step(self, plan) -> int:
        """Close the step (the unused reserved pages return), then count free pages over the ranks,
        as every follower does after its forward."""
        try:
            return self._cache.finish_step(plan)
        finally:
            self.sync_free()

    def live_tokens(self, slot: int) -> torch.Tensor:
        """``[L, Hkv]`` over all ranks (each holds its own heads' lists)."""
        self.send(("live", slot))
        return _gather_live(self._shard, self._cache, slot).to(self._cache.device)

    def rank_stats(self) -> list[dict]:
        """Per rank: KV heads, pool pages, pages and bytes in use now and at the peak, pool bytes."""
        self.send(("stats",))
        return _pool_stats(self._shard, self._cache)


class ShardedModelView:
    """Rank 0's model as the engine calls it: each forward is first sent to the other ranks."""

    def __init__(self, model, view: ShardedCacheView):
        self.__dict__["_model"] = model
        self.__dict__["_view"] = view

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_model"], name)

    def __call__(self, input_ids, positions, step, logits_index=None):
        view: ShardedCacheView = self._view
        plan = step.plan
        li = None if logits_index is None else logits_index.cpu()
        view.send(("forward", input_ids.cpu(), plan.slots_host, plan.starts_host, plan.n_new_host, li))
        try:
            return self._model(input_ids, positions, step, logits_index=logits_index)
        except BaseException:
            view.sync_free()  # a follower counts free pages after its forward, failed or not
            raise

    forward = __call__


def attach(engine, tensor_parallel: int | None = None) -> None:
    """Make ``engine`` (built on rank 0 around a sharded model) drive every rank; called by
    ``Engine.__init__`` when the model is sharded or ``tensor_parallel`` is given."""
    model = engine.model
    shard: TPShard | None = getattr(model, "tp", None)
    if shard is None:
        raise ValueError(f"tensor_parallel={tensor_parallel}: the model was loaded whole; load it with "
                         f"dms_runtime.load(..., tensor_parallel={tensor_parallel})")
    if tensor_parallel not in (None, shard.size):
        raise ValueError(f"tensor_parallel={tensor_parallel}: the model was loaded with tensor_parallel={shard.size}")
    if shard.rank != 0:
        raise ValueError(f"Engine: rank {shard.rank} of a tensor-parallel job follows rank 0; call "
                         "dms_runtime.parallel.run_follower(model) on ranks other than 0")
    _send(shard, ("engine", engine.config, engine.cache.max_model_len))
    view = ShardedCacheView(engine.cache, shard)
    shard.driver = view  # the followers now hold this engine's pools; an older engine may not send any more
    engine.cache = view
    engine.scheduler.cache = view
    engine.runner.cache = view
    engine.model = engine.runner.model = ShardedModelView(model, view)


class _FollowerState:
    """A follower's pool and attention implementation for the engine rank 0 built."""

    def __init__(self, model, config, max_model_len: int):
        self.model = model
        self.cache = PagedKVCache(model.config, config, model.dtype, model.device, max_model_len)
        self.kernels = resolve(config.attention, model.device)

    def forward(self, ids, slots: list[int], starts: list[int], n_new: list[int], logits_index) -> None:
        dev = self.model.device
        plan = StepPlan.build(self.cache, slots, starts, n_new)
        positions = plan.starts[:, None] + torch.arange(plan.t, device=dev)[None, :]
        step = PagedStep(self.cache, plan, self.kernels)
        self.model(ids.to(dev), positions, step, logits_index=None if logits_index is None else logits_index.to(dev))
        self.cache.finish_step(plan)


def _model_of(lm):
    model = getattr(lm, "model", lm)
    shard = getattr(model, "tp", None)
    if shard is None:
        raise ValueError("model: not loaded with tensor_parallel > 1; there is nothing to follow")
    return model, shard


@torch.inference_mode()
def run_follower(lm, *, until_result: bool = False) -> Any:
    """The loop of every rank but 0: apply rank 0's operations to this rank's pool and model
    shard until rank 0 calls :func:`shutdown` (returns None), or, with ``until_result``, until
    rank 0 ends a ``generate()`` call (returns its result)."""
    model, shard = _model_of(lm)
    if shard.rank == 0:
        raise ValueError("run_follower: rank 0 drives the engine; call it on the other ranks")
    state: _FollowerState | None = None
    while True:
        msg = _recv(shard)
        kind = msg[0]
        if kind == "shutdown":
            return None
        if kind == "result":
            if until_result:
                return msg[1]
            continue
        if kind == "error":
            if until_result:
                raise RankZeroFailed(f"rank 0 failed: {msg[1]}")
            continue
        if kind == "engine":
            state = _FollowerState(model, msg[1], msg[2])
        elif kind == "forward":
            try:
                state.forward(*msg[1:])
            except Exception as exc:  # rank 0 ends the batch with finish_reason "error" and goes on
                print(f"dms rank {shard.rank}: forward failed: {exc!r}", file=sys.stderr, flush=True)
            _min_free(shard, state.cache)  # rank 0 counts free pages after its forward, failed or not
        elif kind == "free":
            state.cache.free_seq(msg[1])
            _min_free(shard, state.cache)
        elif kind == "fork":
            state.cache.fork(msg[1], msg[2])
            _min_free(shard, state.cache)
        elif kind == "live":
            _gather_live(shard, state.cache, msg[1])
        elif kind == "stats":
            _pool_stats(shard, state.cache)
        elif kind == "ping":  # an idle server's rank 0: the control group's wait must not time out
            pass
        else:
            raise RuntimeError(f"run_follower: unknown operation {kind!r} from rank 0")


def keepalive(engine) -> None:
    """Rank 0 of an idle tensor-parallel engine (a server waiting for requests): tell the followers
    it is alive, so that their wait on the control group never reaches the process group's timeout.
    Does nothing on a single process."""
    if isinstance(engine.cache, ShardedCacheView):
        engine.cache.send(("ping",))


def shutdown(lm) -> None:
    """Rank 0: end :func:`run_follower` on every other rank."""
    _, shard = _model_of(lm)
    if shard.rank == 0:
        _send(shard, ("shutdown",))


def end_call(lm, result: Any = None, error: BaseException | None = None) -> None:
    """Rank 0: end a ``generate()`` call on the followers with its result (or its error)."""
    _, shard = _model_of(lm)
    if shard.rank == 0:
        _send(shard, ("error", repr(error)) if error is not None else ("result", result))


def rank_stats(engine) -> list[dict]:
    """Per-rank pool counters of a tensor-parallel engine (one dict on a single process)."""
    if isinstance(engine.cache, ShardedCacheView):
        return engine.cache.rank_stats()
    c = engine.cache
    return [{"rank": 0, "kv_heads": c.H, "num_pages": c.P, "pages_in_use": c.pages_in_use, "peak_pages": c.peak_pages,
             "bytes_in_use": c.bytes_in_use, "peak_bytes": c.peak_pages * c.ps * c.token_bytes,
             "pool_bytes": c.P * c.ps * c.token_bytes}]
