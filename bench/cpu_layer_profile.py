"""Per-layer cost of the paged attention and store on CPU: the torch path vs the fused CPU kernels.

One layer of SmolLM2-135M's shapes (9 query heads, 3 KV heads, head dim 64), a cache filled to
--context positions through PagedKVCache.store, then a decode step (T=1) and a prefill chunk
(T=--chunk) timed per call (median of --reps). "dense" holds every token (eviction off, as the
vanilla model); "cr8" evicts so each list holds about context/8 tokens (window 128).

    python bench/cpu_layer_profile.py --context 4096 --batch 1,8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dms_kernels.ops  # noqa: F401  (registers torch.ops.dms.*)
from dms_runtime.config import DMSConfig, ModelConfig
from dms_runtime.paged import PagedConfig, PagedKVCache
from dms_runtime.paged.torch_kernels import torch_paged_attention

HQ, H, D = 9, 3, 64


def make_cache(batch, context, window, evicts, chunk=512, dtype=torch.float32):
    cfg = ModelConfig(arch="llama", vocab_size=8, hidden_size=HQ * D, intermediate_size=8, num_layers=1, num_heads=HQ,
                      num_kv_heads=H, head_dim=D, rms_norm_eps=1e-6, max_position_embeddings=context + 64,
                      rope_theta=1e4, rope_scaling=None, attention_bias=False, o_bias=False, mlp_bias=False,
                      qk_norm=False, tie_word_embeddings=False,
                      dms=DMSConfig(window_size=window) if evicts else None)
    cache = PagedKVCache(cfg, PagedConfig(page_size=16, max_seqs=batch, max_model_len=context + 64), dtype, "cpu",
                         context + 64)
    slots = torch.arange(batch)
    lists = cache.lists(0, slots)
    p_evict = 1 - 1 / 8 * context / max(1, context - window) if evicts else 0.0
    for s0 in range(0, context, chunk):
        n = min(chunk, context - s0)
        starts, n_new = torch.full((batch,), s0), torch.full((batch,), n)
        k, v = torch.randn(batch, H, n, D, dtype=dtype), torch.randn(batch, H, n, D, dtype=dtype)
        ev = torch.rand(batch, H, n) < p_evict
        ev[..., -1] = False
        cache.store(lists, starts, n_new, k, v, ev, mover=lambda *a: torch.ops.dms.paged_store(*a, "cpu"))
        cache.seq_len[slots] += n
    return cache, slots, lists


def timed(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, context {args.context}, per layer, median ms of {args.reps}")
    print(f"{'batch':>5} {'cache':>5} {'held':>6} {'op':>14} {'torch':>9} {'cpu op':>9} {'cpu raw':>9} {'x':>6}")
    from dms_kernels import cpu

    for batch in map(int, args.batch.split(",")):
        for name, evicts in (("dense", False), ("cr8", True)):
            cache, slots, lists = make_cache(batch, args.context, 128, evicts)
            held = float((torch.clamp(cache.seq_len[slots], max=cache.w)[:, None] + cache.kept_len[lists]).float().mean())
            for t, label in ((1, "decode"), (args.chunk, f"chunk {args.chunk}")):
                starts = cache.seq_len[slots].clone()
                n_new = torch.full((batch,), t)
                q = torch.randn(batch, HQ, t, D)
                k, v = torch.randn(batch, H, t, D), torch.randn(batch, H, t, D)
                ev = torch.rand(batch, H, t) < (0.8 if evicts else 0.0)
                ev[..., -1] = False
                a = (q, k, v, ev, n_new, starts, cache.k_pool, cache.v_pool, cache.page_table[lists],
                     cache.kept_len[lists], cache.ring_evict[lists], cache.w, cache.R)
                ref = torch_paged_attention(*a)
                got = torch.ops.dms.paged_attention(*a, None, "cpu")
                err = (got - ref).abs().max().item()
                assert err < 1e-4, err
                tt = timed(lambda: torch_paged_attention(*a), args.reps)
                to = timed(lambda: torch.ops.dms.paged_attention(*a, None, "cpu"), args.reps)
                tr = timed(lambda: cpu.paged_attention(*a), args.reps)
                print(f"{batch:>5} {name:>5} {held:>6.0f} {'attn ' + label:>14} {tt:>9.3f} {to:>9.3f} {tr:>9.3f} "
                      f"{tt / to:>6.1f}")
            # store of one decode step (bookkeeping + data movement), restored after each call
            starts = cache.seq_len[slots].clone()
            n_new = torch.ones(batch, dtype=torch.int64)
            k, v = torch.randn(batch, H, 1, D), torch.randn(batch, H, 1, D)
            ev = torch.zeros(batch, H, 1, dtype=torch.bool)
            state = [x.clone() for x in (cache.page_table, cache.kept_len, cache.ring_evict, cache.page_ref,
                                         cache.free_stack)]
            top = cache.free_top

            def store(mover):
                def run():
                    cache.store(lists, starts, n_new, k, v, ev, mover=mover)
                    for dst, src in zip((cache.page_table, cache.kept_len, cache.ring_evict, cache.page_ref,
                                         cache.free_stack), state):
                        dst.copy_(src)
                    cache.free_top = top
                return run

            ts = timed(store(None), args.reps)
            tc = timed(store(lambda *a_: torch.ops.dms.paged_store(*a_, "cpu")), args.reps)
            print(f"{batch:>5} {name:>5} {held:>6.0f} {'store decode':>14} {ts:>9.3f} {tc:>9.3f} {'':>9} {ts / tc:>6.1f}")


if __name__ == "__main__":
    main()
