"""DMS vs dense through the paged engine on CPU, side by side in one run.

The serving regime: ``--batch`` sequences of ``--total`` tokens each (prompt + generated), where
KV traffic outweighs the weights, plus a batch-1 row. Prints peak KV bytes and decode tokens/s
of each mode and their ratios, and writes a JSON record to ``bench/results/``.

Until the project's retrofitted SmolLM2 exists, the DMS rows use FORCED decisions: every token
is marked for eviction with probability ``--evict-rate`` (a seeded Bernoulli draw replacing the
model's logits), with the delay window ``--window``. The dense rows run the same model with
eviction off through the same engine.

    .venv/bin/python bench/bench_paged_cpu.py                      # 8 x 8K and 1 x 8K (about 20 min)
    .venv/bin/python bench/bench_paged_cpu.py --total 1024 --gen 16  # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

import dms_runtime as dr
from dms_runtime.config import DMSConfig
from dms_runtime.engine import Engine
from dms_runtime.paged import PagedConfig
from dms_runtime.sampling import SamplingParams


class ForcedDecisions:
    """A kernel set wrapping the engine's: the projection runs in torch and its eviction logits are
    replaced by +1 (evict) with probability ``rate``, else -1; attention and store are the inner
    set's. A benchmark device: the runtime itself has no hook for it."""

    def __init__(self, inner, rate: float, seed: int):
        self.inner, self.rate = inner, rate
        self.name = f"{inner.name}+forced"
        self.gen = torch.Generator().manual_seed(seed)

    def projection(self, cfg):
        return "torch"  # the previous key's decision is recorded from the forced logits

    def ran(self, cfg, plan, dtype):
        return {**self.inner.ran(cfg, plan, dtype), "projection": "torch"}

    def project(self, cache, plan, lists, attn, q_lin, k_lin, h_pre, cos, sin):
        q, k, logits = attn._project(q_lin, k_lin, h_pre, cos, sin)
        if logits is not None:
            draw = torch.rand(logits.shape, generator=self.gen) < self.rate
            logits = torch.where(draw, 1.0, -1.0).to(logits.device)
        return q, k, logits

    def attend(self, *args):
        return self.inner.attend(*args)

    def store(self, *args):
        return self.inner.store(*args)


def run(mode, batch, total, gen, args):
    dms = mode == "dms"
    model = dr.load(args.model, dms=DMSConfig(window_size=args.window, separate_alpha=True) if dms else None).model
    torch.manual_seed(args.seed)
    prompts = [torch.randint(0, model.config.vocab_size, (total - gen,)).tolist() for _ in range(batch)]
    cfg = PagedConfig(page_size=args.page_size, max_seqs=batch, max_model_len=total, prefill_chunk=args.chunk)
    engine = Engine(model, cfg, eos_ids=set())
    if dms:
        engine.runner.kernels = ForcedDecisions(engine.runner.kernels, args.evict_rate, args.seed)
    params = SamplingParams(max_new_tokens=gen, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    t0 = time.perf_counter()
    announced = False
    while engine.has_unfinished():
        engine.step()
        if engine.stats.decode_steps == 1 and not announced:
            print(f"# {mode} batch {batch}: prefill done in {time.perf_counter() - t0:.0f} s, decoding", flush=True)
            announced = True
    wall = time.perf_counter() - t0
    st, cache = engine.stats, engine.cache
    live = sum(sum(map(sum, o.live_tokens)) for o in engine.outputs.values())
    return {
        "mode": mode, "batch": batch, "total_tokens": total, "generated": gen,
        "wall_s": wall, "prefill_s": st.prefill_s, "decode_s": st.decode_s,
        "decode_tok_s": st.decode_tokens / st.decode_s,
        "peak_kv_bytes": cache.peak_pages * cache.ps * cache.token_bytes,
        "dense_equiv_kv_bytes": st.peak_dense_bytes,
        "live_tokens_at_end": live,
        "kv_bytes_read": st.kv_bytes_read,
        "final_pool_bytes": cache.bytes_in_use,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--total", type=int, default=8192, help="tokens per sequence, prompt + generated")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--evict-rate", type=float, default=0.9)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-batch1", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    rows = []
    shapes = [(args.batch, args.total)] + ([] if args.no_batch1 or args.batch == 1 else [(1, args.total)])
    for batch, total in shapes:
        for mode in ("dense", "dms"):
            row = run(mode, batch, total, args.gen, args)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\nDMS (forced decisions, evict rate {args.evict_rate}, window {args.window}) vs dense, "
          f"SmolLM2-135M fp32, CPU {torch.get_num_threads()} threads, page size {args.page_size}")
    print(f"{'batch':>5} {'tokens':>7} | {'dense MiB':>9} {'DMS MiB':>8} {'mem ratio':>9} | "
          f"{'dense tok/s':>11} {'DMS tok/s':>9} {'speed ratio':>11}")
    summary = []
    for i in range(0, len(rows), 2):
        d, m = rows[i], rows[i + 1]
        mem = d["peak_kv_bytes"] / m["peak_kv_bytes"]
        spd = m["decode_tok_s"] / d["decode_tok_s"]
        summary.append({"batch": d["batch"], "total_tokens": d["total_tokens"], "kv_memory_ratio": mem,
                        "decode_speed_ratio": spd})
        print(f"{d['batch']:>5} {d['total_tokens']:>7} | {d['peak_kv_bytes'] / 2**20:>9.1f} "
              f"{m['peak_kv_bytes'] / 2**20:>8.1f} {mem:>8.2f}x | {d['decode_tok_s']:>11.2f} "
              f"{m['decode_tok_s']:>9.2f} {spd:>10.2f}x")

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    record = {
        "date": datetime.date.today().isoformat(), "commit": commit, "machine": platform.machine(),
        "processor": platform.processor(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "args": vars(args), "rows": rows, "summary": summary,
        "note": "DMS rows use forced decisions (Bernoulli evict-rate), not a retrofitted model",
    }
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"{record['date']}-cpu-paged.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
