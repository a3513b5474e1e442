"""Tensor parallelism: per-rank KV bytes and step time at several TP sizes, one prompt.

One request of ``--prompt-len`` random tokens (chunked prefill) then ``--decode`` decode steps,
greedy, through the engine on rank 0 driving the other ranks. For each TP size it reports, per
rank, the KV heads held, the pool's peak bytes in use (its own counter), the live KV bytes of
its heads at the end, and on rank 0 the prefill time and the median decode step. The tokens of
every TP size are checked against TP 1 first.

    .venv/bin/python bench/bench_tp.py --tp 1 3                        # the CR 8 SmolLM2 (3 KV heads), CPU/gloo
    .venv/bin/python bench/bench_tp.py --model random-llama --tp 1 2    # a random Llama with 4 KV heads
    .venv/bin/python bench/bench_tp.py --device cuda --tp 1 2 4 --model <folder>  # GPUs: NCCL

TP N > 1 runs as ``torchrun --nproc_per_node N bench/bench_tp.py --worker ...`` (started here).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RANDOM_LLAMA = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)


def random_llama(folder: Path) -> Path:
    """A random Llama with 4 KV heads and a borrowed-channel DMS config (window 64)."""
    if not (folder / "config.json").is_file():
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**RANDOM_LLAMA)).save_pretrained(str(folder))
        raw = json.loads((folder / "config.json").read_text())
        raw.update(dms_window_size=64, dms_alpha_scale=100.0, dms_initial_alpha_offset=5.0)
        (folder / "config.json").write_text(json.dumps(raw))
    return folder


def worker(args) -> dict | None:
    import dms_runtime as dr
    from dms_runtime import parallel
    from dms_runtime.engine import Engine
    from dms_runtime.paged import PagedConfig
    from dms_runtime.sampling import SamplingParams

    tp = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads)
    lm = dr.load(args.model, dtype=args.dtype, device=args.device, tensor_parallel=tp)
    if tp > 1 and lm.model.tp.rank != 0:
        parallel.run_follower(lm)
        parallel.close()
        return None
    dev = lm.model.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    prompt = torch.randint(0, lm.config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_new_tokens=args.decode, ignore_eos=True)
    cfg = PagedConfig(page_size=16, max_seqs=1, max_model_len=args.prompt_len + args.decode + 16,
                      prefill_chunk=args.chunk)
    warm = Engine(lm.model, cfg, eos_ids=set())
    warm.add_request(prompt[:16].tolist(), SamplingParams(max_new_tokens=2, ignore_eos=True))
    warm.run()
    engine = Engine(lm.model, cfg, eos_ids=set())
    rid = engine.add_request(prompt.tolist(), params)[0]
    prefill_s, decode, peak = 0.0, [], None
    while engine.has_unfinished():
        sync()
        t0 = time.perf_counter()
        prefill = any(r.prefilling for r in engine.scheduler.running) or bool(engine.scheduler.waiting)
        engine.step()
        sync()
        dt = time.perf_counter() - t0
        if prefill:
            prefill_s += dt
        else:
            decode.append(dt)
        if engine.has_unfinished():
            peak = parallel.rank_stats(engine)  # before the request ends and frees its pages
    out = engine.outputs[rid]
    live = torch.tensor(out.live_tokens)  # [L, Hkv], all heads
    token_bytes = 2 * lm.config.head_dim * lm.model.dtype.itemsize
    per = lm.config.num_kv_heads // tp
    ranks = []
    for s in peak:
        r = s["rank"]
        ranks.append({"rank": r, "kv_heads": s["kv_heads"], "pool_bytes": s["pool_bytes"],
                      "peak_bytes": s["peak_bytes"], "in_use_bytes": s["bytes_in_use"],
                      "live_bytes": int(live[:, r * per:(r + 1) * per].sum()) * token_bytes})
    res = {"tp": tp, "tokens": out.token_ids, "prefill_s": prefill_s, "decode_step_ms": 1e3 * statistics.median(decode),
           "decode_steps": len(decode), "ranks": ranks, "device": str(dev),
           "backend": lm.model.tp.tp.backend if tp > 1 else "-"}
    if tp > 1:
        parallel.shutdown(lm)
        parallel.close()
    return res


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct-dms-cr8",
                    help="embedded name, folder, or 'random-llama' (4 KV heads, made once)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model == "random-llama":
        args.model = str(random_llama(Path(tempfile.gettempdir()) / "dms-bench-random-llama"))
    if args.worker:
        res = worker(args)
        if res is not None:
            Path(args.out).write_text(json.dumps(res))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    results = []
    for n in args.tp:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(_port()), __file__, "--worker", "--out", out, "--model", args.model, "--prompt-len",
               str(args.prompt_len), "--decode", str(args.decode), "--chunk", str(args.chunk), "--dtype", args.dtype,
               "--device", args.device, "--threads", str(args.threads)]
        if n == 1:
            cmd = [sys.executable, __file__] + cmd[cmd.index("--worker"):]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            return run.returncode
        results.append(json.loads(Path(out).read_text()))
    base = results[0]
    for r in results[1:]:
        if r["tokens"] != base["tokens"]:
            print(f"TP {r['tp']} tokens differ from TP {base['tp']}", file=sys.stderr)
            return 1
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    print(f"model {args.model}, prompt {args.prompt_len} tokens (prefill chunk {args.chunk}), {args.decode} decode "
          f"steps, {args.dtype}, {args.device}, {args.threads} thread(s)/process, torch {torch.__version__}, "
          f"{platform.machine()} {os.cpu_count()} cores, commit {commit}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; tokens identical across TP sizes")
    print("\n| TP | backend | rank | KV heads | pool bytes | peak KV bytes in use | live KV bytes | prefill s | decode step ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        for s in r["ranks"]:
            first = s["rank"] == 0
            print(f"| {r['tp']} | {r['backend']} | {s['rank']} | {s['kv_heads']} | {s['pool_bytes']:,} | "
                  f"{s['peak_bytes']:,} | {s['live_bytes']:,} | "
                  + (f"{r['prefill_s']:.2f} | {r['decode_step_ms']:.1f} |" if first else "| |"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
