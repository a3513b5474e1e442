"""Load generator for ``dms serve``: a fixed number of requests at a fixed concurrency over loopback.

By default it starts one server per model (the DMS CR 8 retrofit, then the vanilla model) with the
same ``--kv-memory`` budget, drives each with the official ``openai`` client (AsyncOpenAI,
streaming, greedy, ``ignore_eos`` so every request makes exactly ``--max-tokens`` tokens), and
prints a markdown table: requests/s, output tokens/s, time to first token and inter-token latency
(p50 / p99), and from ``/metrics`` (polled while the load runs) the most sequences running at once,
the most pool pages in use, the live vs dense KV tokens and the preemptions. With ``--url`` it
drives a server that is already running instead (one model).

    python bench/bench_serve.py --concurrency 8 --requests 16 --max-tokens 32 --prompt-words 48
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
PASSAGE = (
    "The lighthouse stood at the end of a long spit of rock, and every evening the keeper climbed its "
    "spiral stairs to light the lamp. Ships passed far out at sea, their lights small and steady, and "
    "the keeper wrote each one down in a worn notebook: the hour, the direction, the weather, the state "
    "of the tide. In winter the storms came in from the west and the waves broke over the lower windows, "
    "but the lamp never failed. One morning, walking the shore after a gale, the keeper found a green "
    "bottle wedged between two stones, its cork sealed with wax, and inside it a folded letter written in "
    "a careful, old-fashioned hand. "
).split()


def prompt(i: int, words: int) -> str:
    """Request ``i``: its own opening, then ``words`` words of the passage from a shifted start."""
    body = [PASSAGE[(i * 7 + k) % len(PASSAGE)] for k in range(words)]
    return f"Story {i}. " + " ".join(body) + "\nContinue the story:"


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in fam.samples:
            if not s.labels:
                out[s.name] = s.value
    return out


def start_server(model: str, args) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = Path(args.log_dir) / f"serve-{model.replace('/', '_')}-{port}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "dms_runtime.cli", "serve", "--model", model, "--port", str(port),
           "--max-seqs", str(args.max_seqs), "--kv-memory", str(args.kv_memory),
           "--max-waiting", str(max(args.requests, 1)), "--max-model-len", str(args.max_model_len)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"dms serve {model} exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"dms serve {model} not ready after {args.start_timeout} s; see {log}")


async def one(client: AsyncOpenAI, model: str, text: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    times, prompt_tokens = [], 0
    stream = await client.completions.create(model=model, prompt=text, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True, "return_token_ids": True})
    async for ch in stream:
        now = time.perf_counter()
        if ch.usage is not None:
            prompt_tokens = ch.usage.prompt_tokens
        for c in ch.choices:
            times += [now] * len(c.token_ids)
    return {"start": t0, "times": times, "prompt_tokens": prompt_tokens}


async def load(url: str, model: str, args) -> dict:
    sem = asyncio.Semaphore(args.concurrency)
    peaks = {"dms_requests_running": 0.0, "dms_kv_pages_used": 0.0, "dms_kv_live_tokens": 0.0,
             "dms_kv_dense_tokens": 0.0}
    done = asyncio.Event()

    async def poll():
        async with httpx.AsyncClient(timeout=30) as h:
            while not done.is_set():
                text = (await h.get(f"{url}/metrics")).text
                for fam in text_string_to_metric_families(text):
                    for s in fam.samples:
                        if s.name in peaks:
                            peaks[s.name] = max(peaks[s.name], s.value)
                await asyncio.sleep(0.1)

    async with AsyncOpenAI(base_url=f"{url}/v1", api_key=args.api_key or "none", timeout=args.timeout,
                           max_retries=0) as client:
        await one(client, model, prompt(10**6, 8), 2)  # warm-up, not counted
        before = scrape(url)

        async def bounded(i):
            async with sem:
                return await one(client, model, prompt(i, args.prompt_words), args.max_tokens)

        poller = asyncio.create_task(poll())
        t0 = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(bounded(i) for i in range(args.requests))), args.timeout)
        elapsed = time.perf_counter() - t0
        done.set()
        await poller
    after = scrape(url)
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    out_tokens = sum(len(r["times"]) for r in results)
    return {
        "model": model, "requests": len(results), "elapsed_s": elapsed, "requests_per_s": len(results) / elapsed,
        "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / elapsed,
        "prompt_tokens_mean": statistics.mean(r["prompt_tokens"] for r in results),
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
        "peak_running": peaks["dms_requests_running"], "peak_pages_used": peaks["dms_kv_pages_used"],
        "pages_total": after["dms_kv_pages_total"], "peak_live_tokens": peaks["dms_kv_live_tokens"],
        "peak_dense_tokens": peaks["dms_kv_dense_tokens"],
        "preemptions": after["dms_preemptions_total"] - before["dms_preemptions_total"],
    }


def table(rows: list[dict]) -> str:
    head = ("| model | req/s | output tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (s) | most running | "
            "most pages used / pool | peak live / dense KV tokens | preemptions |")
    lines = [head, "| --- " * 9 + "|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['requests_per_s']:.3f} | {r['output_tokens_per_s']:.2f} | "
            f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | {r['itl_p50_s']:.3f} / {r['itl_p99_s']:.3f} | "
            f"{r['peak_running']:.0f} | {r['peak_pages_used']:.0f} / {r['pages_total']:.0f} | "
            f"{r['peak_live_tokens']:.0f} / {r['peak_dense_tokens']:.0f} | {r['preemptions']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m-instruct-dms-cr8,smollm2-135m-instruct",
                    help="comma-separated; one server each, the same budget (default: CR 8 vs vanilla)")
    ap.add_argument("--url", default=None, help="drive this running server instead (the first of --models)")
    ap.add_argument("--api-key", default=os.environ.get("DMS_API_KEY"))
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=48)
    ap.add_argument("--max-seqs", type=int, default=8)
    ap.add_argument("--kv-memory", type=int, default=32 << 20)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None, help="the servers' torch CPU threads (default: torch's)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds for the whole load of one model")
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--log-dir", default="/tmp")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    for name in ("concurrency", "requests", "max_tokens", "prompt_words", "max_seqs", "kv_memory"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}")
    models = [m for m in args.models.split(",") if m]
    rows = []
    for model in models[:1] if args.url else models:
        if args.url:
            rows.append(asyncio.run(load(args.url.rstrip("/"), model, args)))
            continue
        proc, url, log = start_server(model, args)
        try:
            rows.append(asyncio.run(load(url, model, args)))
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(f"{model}: done in {rows[-1]['elapsed_s']:.1f} s", file=sys.stderr)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
            "cpus": os.cpu_count(), "args": vars(args)}
    print(f"concurrency {args.concurrency}, {args.requests} requests, {args.max_tokens} output tokens each, "
          f"prompts of {rows[0]['prompt_tokens_mean']:.0f} tokens on average, --kv-memory {args.kv_memory}, "
          f"--max-seqs {args.max_seqs}")
    print(table(rows))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
