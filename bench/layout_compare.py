"""Compare three paged layouts for one DMS list by simulation: pages held and tokens read.

* ring+kept  (ours): the window in a ring of ``w`` slots, kept tokens appended densely after it.
* slot-reuse: one list; a token whose window ends evicted leaves a hole that the next token
  written fills (lowest hole first); a page returns to the pool only when all its slots are holes;
  a kernel reads every slot of the pages held (holes masked).
* compaction: one list kept dense by moving tail tokens into holes; holds and reads the live
  tokens, and moves tokens every step.

The last column counts token copies per decode step: ring+kept copies a token once when its
window ends with *keep*; compaction moves one token per eviction; slot reuse copies nothing.

Decisions are Bernoulli(``rate``) per token; a prompt is prefilled in chunks, then tokens are
decoded one at a time. The numbers are averages over decode steps and over ``--lists`` lists.

    python bench/layout_compare.py --total 8192 --window 256 --page-size 16
"""

from __future__ import annotations

import argparse
import math
import random


def simulate(total, prompt, chunk, w, ps, rate, seed):
    rnd = random.Random(seed)
    evict = [rnd.random() < rate for _ in range(total)]
    # ---- slot reuse state
    slot_of: dict[int, int] = {}
    holes: list[int] = []
    high = 0  # slots ever used
    page_live = {}  # page -> live tokens in it
    # ---- per-step accumulators (decode steps only)
    acc = {"ring+kept": [0, 0], "slot-reuse": [0, 0], "compaction": [0, 0], "moves": 0, "copies": 0}
    kept = 0
    live_set: set[int] = set()
    s = 0
    while s < total:
        n = min(chunk, prompt - s) if s < prompt else 1
        end = s + n
        # tokens leaving the window after this step: positions < end - w that are evicted
        leaving = [j for j in range(max(0, s - w), max(0, end - w)) if evict[j] and j != end - 1]
        newly_kept = [j for j in range(max(0, s - w), max(0, end - w)) if not evict[j]]
        kept += len(newly_kept)
        survivors = [p for p in range(s, end) if p >= end - w or not evict[p]]
        # slot reuse: free the leaving tokens' slots (those written), then write the survivors
        for j in leaving:
            if j in slot_of:
                sl = slot_of.pop(j)
                holes.append(sl)
                page_live[sl // ps] -= 1
        holes.sort()
        for p in survivors:
            if holes:
                sl = holes.pop(0)
            else:
                sl = high
                high += 1
            slot_of[p] = sl
            page_live[sl // ps] = page_live.get(sl // ps, 0) + 1
        live_set.update(survivors)
        live_set.difference_update(leaving)
        live = len(live_set)
        if s >= prompt:  # a decode step: record what each layout holds (pages) and reads (tokens)
            ring_tokens = min(end, w)
            pages_ours = math.ceil(ring_tokens / ps) + math.ceil(kept / ps)
            acc["ring+kept"][0] += pages_ours
            acc["ring+kept"][1] += ring_tokens + kept
            pages_reuse = sum(1 for v in page_live.values() if v > 0)
            acc["slot-reuse"][0] += pages_reuse
            acc["slot-reuse"][1] += pages_reuse * ps
            acc["compaction"][0] += math.ceil(live / ps)
            acc["compaction"][1] += live
            acc["moves"] += len(leaving)  # compaction fills each hole with a moved tail token
            acc["copies"] += len(newly_kept)  # ring+kept copies a token once, when its window ends kept
        s = end
    steps = total - prompt
    return {k: (v[0] / steps, v[1] / steps) if isinstance(v, list) else v / steps for k, v in acc.items()}, live


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--total", type=int, default=8192)
    ap.add_argument("--gen", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--lists", type=int, default=8)
    args = ap.parse_args()
    print(f"one list, {args.total} tokens ({args.total - args.gen} prefilled in chunks of {args.chunk}, "
          f"{args.gen} decoded), window {args.window}, page size {args.page_size}; averages over decode steps")
    print(f"{'evict rate':>10} | {'layout':>11} | {'pages held':>10} | {'tokens read':>11} | {'copies/step':>10}")
    for rate in (0.5, 0.875, 0.95):
        tot: dict = {}
        for seed in range(args.lists):
            res, _ = simulate(args.total, args.total - args.gen, args.chunk, args.window, args.page_size, rate, seed)
            for k, v in res.items():
                tot.setdefault(k, []).append(v)
        for layout in ("ring+kept", "slot-reuse", "compaction"):
            pages = sum(v[0] for v in tot[layout]) / args.lists
            read = sum(v[1] for v in tot[layout]) / args.lists
            key = {"compaction": "moves", "ring+kept": "copies"}.get(layout)
            moves = sum(tot[key]) / args.lists if key else 0.0
            print(f"{rate:>10} | {layout:>11} | {pages:>10.1f} | {read:>11.1f} | {moves:>10.2f}")


if __name__ == "__main__":
    main()
