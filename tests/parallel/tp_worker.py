"""Work done inside each process of the tensor-parallel tests (started by test_tensor_parallel.py).

Rank 0 runs every scenario on the sharded model, driving the other ranks; then the processes
share out the same scenarios on the whole model (TP 1). Each saves what it ran; the test merges.
"""

from __future__ import annotations

import os

import torch

import dms_runtime as dr
from dms_runtime import parallel
from dms_runtime.engine import Engine
from dms_runtime.paged import PagedConfig
from dms_runtime.sampling import SamplingParams

DTYPE = torch.float64  # decisions are `logit > 0`: keep TP's different summation order far from any flip


def _rows_of_rank(cache, rank: int, n: int) -> torch.Tensor:
    """TP 1 list ids whose KV head belongs to ``rank`` of ``n``."""
    ids = torch.arange(cache.NL)
    h = cache.H // n
    head = ids % cache.H
    return ids[(head >= rank * h) & (head < (rank + 1) * h)]


def _pages_of_rank(cache, rank: int, n: int) -> int:
    pt = cache.page_table[_rows_of_rank(cache, rank, n)]
    return int(torch.unique(pt[pt >= 0]).numel())


def _run(model, prompts, params, pcfg, n_samples=1, tp1_cache_probe=None, world=1):
    """Step an engine to the end; per step, the pool counters of every rank."""
    eng = Engine(model, pcfg)
    ids = [eng.add_request(p, params, n=n_samples) for p in prompts]
    per_step = []
    while eng.has_unfinished():
        eng.step()
        if world > 1:
            per_step.append([s["pages_in_use"] for s in parallel.rank_stats(eng)])
        else:
            per_step.append([_pages_of_rank(eng.cache, r, tp1_cache_probe) for r in range(tp1_cache_probe)]
                            + [eng.cache.pages_in_use])
    outs = [eng.outputs[i] for g in ids for i in g]
    return {
        "tokens": [o.token_ids for o in outs],
        "live": [o.live_tokens for o in outs],
        "reasons": [o.finish_reason for o in outs],
        "pages": per_step,
        "pool": parallel.rank_stats(eng),
        "preemptions": eng.scheduler.preemptions,
        "prefill_steps": eng.stats.prefill_steps,
    }


def scenarios(lm, world, prompts, which=("chunks_decode", "forks", "preemption")):
    big = PagedConfig(page_size=4, max_seqs=6, prefill_chunk=7, max_model_len=64, num_pages=2400 // world)
    greedy = SamplingParams(max_new_tokens=8, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=0.9, seed=11)
    tiny = PagedConfig(page_size=4, max_seqs=4, prefill_chunk=16, max_model_len=64, num_pages=104 // world)
    probe = None if world > 1 else 2
    runs = {
        "chunks_decode": lambda: _run(lm.model, prompts[:3], greedy, big, tp1_cache_probe=probe, world=world),
        "forks": lambda: _run(lm.model, prompts[:2], sampled, big, n_samples=3, tp1_cache_probe=probe, world=world),
        "preemption": lambda: _run(lm.model, prompts, SamplingParams(max_new_tokens=12, ignore_eos=True), tiny,
                                   tp1_cache_probe=probe, world=world),
    }
    return {k: runs[k]() for k in which}


def main(rank: int, world: int, port: int, cases: list, out_dir: str, generate_cases=()) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 131, (n,), generator=g).tolist() for n in (13, 20, 5, 9)]
    results: dict = {}
    for name, folder, dms, which in cases:  # TP: rank 0 drives, the others follow
        lm = dr.load(folder, dtype=DTYPE, tensor_parallel=world, dms=dms)
        if rank == 0:
            results[name] = {"tp": scenarios(lm, world, prompts, which), "local_heads": lm.model.config.num_kv_heads,
                             "heads": lm.config.num_kv_heads}
            if name == cases[0][0]:  # an engine replaced by a newer one may not send
                old = Engine(lm.model, PagedConfig(page_size=4, max_seqs=1, max_model_len=32, num_pages=64))
                Engine(lm.model, PagedConfig(page_size=4, max_seqs=1, max_model_len=32, num_pages=64))
                old.add_request(prompts[0], SamplingParams(max_new_tokens=2))
                try:
                    old.step()
                    results[name]["replaced_engine_error"] = None
                except RuntimeError as exc:
                    results[name]["replaced_engine_error"] = str(exc)
            parallel.shutdown(lm)
        else:
            parallel.run_follower(lm)
        if name in generate_cases:  # generate(): every rank calls it and gets rank 0's result
            res = dr.generate(lm, prompts[:2], max_new_tokens=5, ignore_eos=True, tensor_parallel=world)
            results.setdefault(name, {})[f"generate_rank{rank}"] = res.token_ids
    for i, (name, folder, dms, which) in enumerate(cases):  # TP 1 references, shared out between the processes
        if i % world != rank:
            continue
        whole = dr.load(folder, dtype=DTYPE, dms=dms)
        results.setdefault(name, {})["tp1"] = scenarios(whole, 1, prompts, which)
        if name in generate_cases:
            results[name]["generate_tp1"] = dr.generate(whole, prompts[:2], max_new_tokens=5,
                                                        ignore_eos=True).token_ids
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    parallel.close()
