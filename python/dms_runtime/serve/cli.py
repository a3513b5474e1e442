"""``dms serve``: load a model, build the app, run it under uvicorn."""

from __future__ import annotations

import os
import sys

DEFAULT_MODEL = "smollm2-135m-instruct"


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"embedded name, model folder or .gguf file (default {DEFAULT_MODEL}); also the model id clients send")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-seqs", type=int, default=16, help="sequences in the running batch at most")
    p.add_argument("--kv-memory", type=int, default=None, metavar="BYTES",
                   help="bytes of the KV page pool (default: the engine's, at most 1 GiB)")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="sequences that may wait beyond the running ones; more get 503 with Retry-After")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + max_tokens (default: the model's context)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--defer-budget", type=int, default=0, metavar="TOKENS",
                   help="deferred eviction: keys DMS marks stay while a sequence holds fewer than TOKENS per layer "
                        "and KV head on average, oldest leave first (default 0: DMS's minimum)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $DMS_API_KEY)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's); 1 avoids oversubscription on a shared machine")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="shard the model over N processes by KV head: `torchrun --nproc_per_node N -m dms_runtime.cli "
                        "serve --tensor-parallel N ...`; rank 0 serves HTTP, the other ranks follow it")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])


def run(args) -> int:
    import uvicorn

    import dms_runtime as dr

    from .app import ServeConfig, create_app

    if not 0 < args.port < 65536:
        raise ValueError(f"--port: expected an int in [1, 65535], got {args.port}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: expected an int >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    key = args.api_key if args.api_key is not None else (os.environ.get("DMS_API_KEY") or None)
    cfg = ServeConfig(model_name=args.model, max_seqs=args.max_seqs, kv_memory_bytes=args.kv_memory,
                      page_size=args.page_size, max_model_len=args.max_model_len, api_key=key,
                      max_waiting=args.max_waiting, max_body_bytes=args.max_body_bytes,
                      defer_budget=args.defer_budget)
    lm = dr.load(args.model, dtype=args.dtype, device=args.device, tensor_parallel=args.tensor_parallel)
    if args.tensor_parallel > 1 and lm.model.tp.rank != 0:  # the HTTP server and the engine live on rank 0
        import signal

        from ..parallel import close, run_follower

        # Ctrl-C reaches every rank of the job; a follower waits for rank 0 to release it (rank 0
        # stops serving, then sends shutdown), so that no rank leaves a collective half done
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            run_follower(lm)
        finally:
            close()
        return 0
    app = create_app(lm, cfg)
    server = app.state.server
    cache = server.engine.cache
    mode = f"DMS eviction on (window {server.window})" if server.eviction else "eviction off (vanilla)"
    print(f"dms serve: {args.model} ({mode}) on http://{args.host}:{args.port}/v1 | pool {cache.P} pages of "
          f"{cache.ps} tokens ({cache.P * cache.ps * cache.token_bytes / 2**20:.1f} MiB), max_seqs {cache.max_seqs}, "
          f"longest request {server.fit} tokens{' | API key required' if key else ''}", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        if args.tensor_parallel > 1:
            from ..parallel import close, shutdown

            server.loop.stop()  # the engine loop ends before rank 0 releases the followers
            try:
                shutdown(lm)
            except RuntimeError as exc:  # a follower already gone (killed): nothing left to release
                print(f"dms serve: the other ranks could not be told to stop: {str(exc).splitlines()[0]}",
                      file=sys.stderr)
            close()
    return 0
