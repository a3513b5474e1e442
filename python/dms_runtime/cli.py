"""``dms`` command line: ``dms generate`` (and ``retrofit``, ``eval``, ``serve`` from their packages)."""

from __future__ import annotations

import argparse
import json
import sys

from . import validation as V
from .paged.cache import PagedConfig
from .validation import cli_float, cli_int

DEFAULT_MODEL = "smollm2-135m-instruct"


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text for one or more prompts")
    p.add_argument("prompts", nargs="*", help="prompts (also --prompt, repeatable)")
    p.add_argument("--prompt", "-p", action="append", default=[], dest="more_prompts")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"embedded name, model folder or .gguf file (default {DEFAULT_MODEL})")
    p.add_argument("--max-new-tokens", "-n", type=cli_int(1, V.MAX_TOKENS), default=64)
    p.add_argument("--temperature", "-t", type=cli_float(0), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=cli_int(0, V.MAX_TOKENS), default=0)
    p.add_argument("--top-p", type=cli_float(0, 1, lo_open=True), default=1.0)
    p.add_argument("--seed", type=cli_int(0, V.MAX_SEED), default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the chat template")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    V.add_dms_overrides(p)
    p.add_argument("--no-eviction", action="store_true", help="run a DMS model with eviction off")
    p.add_argument("--backend", default="paged", choices=["paged", "oracle"],
                   help="paged (the serving engine, default) or oracle (the dense cache the paged runtime is tested against)")
    p.add_argument("--samples", type=cli_int(1, V.MAX_SAMPLES), default=1,
                   help="parallel samples per prompt (paged; share prompt pages)")
    p.add_argument("--page-size", type=cli_int(1, V.MAX_PAGE_SIZE), default=16)
    p.add_argument("--defer-budget", type=cli_int(0, V.MAX_TOKENS), default=0, metavar="TOKENS",
                   help="deferred eviction (paged): keys DMS marks stay while a sequence holds fewer than TOKENS "
                        "per layer and KV head on average, oldest leave first (default 0: DMS's minimum)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are made (one prompt)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="shard the model over N processes by KV head: `torchrun --nproc_per_node N -m dms_runtime.cli "
                        "generate --tensor-parallel N ...` (rank 0 prints)")


def _generate(args) -> int:
    import dms_runtime as dr

    prompts = list(args.prompts) + list(args.more_prompts)
    if not prompts:
        print("dms generate: give at least one prompt (positional or --prompt)", file=sys.stderr)
        return 2
    if args.defer_budget and args.backend != "paged":
        print("dms generate: --defer-budget needs the paged backend", file=sys.stderr)
        return 2
    dms = V.dms_overrides(args)
    if args.no_eviction:
        dms["dms_disable_eviction"] = True
    lm = dr.load(args.model, dtype=args.dtype, device=args.device, dms=dms or None,
                 tensor_parallel=args.tensor_parallel)
    rank = lm.model.tp.rank if args.tensor_parallel > 1 else 0
    if args.stream:
        if rank != 0:
            from .parallel import run_follower

            run_follower(lm)
            return 0
        try:
            return _stream(lm, prompts, args)
        finally:
            if args.tensor_parallel > 1:
                from .parallel import shutdown

                shutdown(lm)
    if rank != 0:  # every rank runs its shard; rank 0 reports (and prints any error)
        from .parallel import RankZeroFailed

        try:
            dr.generate(lm, prompts)
        except RankZeroFailed:
            return 2
        return 0
    result = dr.generate(
        lm,
        prompts,
        chat=False if args.no_chat else None,
        backend=args.backend,
        **({"n": args.samples, "paged": PagedConfig(page_size=args.page_size, defer_budget=args.defer_budget)} if args.backend == "paged" else {}),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    notice = None
    if not lm.config.dms_active:
        reason = "its DMS retrofit does not exist yet" if lm.config.dms is None else "eviction was switched off"
        notice = f"{args.model}: {reason}; running with eviction off (a dense cache)."
    if args.json:
        out = {"model": args.model, "prompts": prompts, **result.to_dict(), "notice": notice}
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    if notice:
        print(f"note: {notice}")
    per = args.samples if args.backend == "paged" else 1
    for i, text in enumerate(result.texts):
        label = prompts[i // per] + (f"  [sample {i % per + 1}/{per}]" if per > 1 else "")
        print(f"\n>>> {label}\n{text}")
    print()
    print(result.stats.line())
    return 0


def _stream(lm, prompts, args) -> int:
    """Stream tokens of each prompt through an engine as they are made."""
    from .api import encode_prompts
    from .engine import Engine
    from .sampling import SamplingParams

    if args.backend != "paged":
        print("dms generate: --stream needs the paged backend", file=sys.stderr)
        return 2
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    ids = encode_prompts(lm, prompts, False if args.no_chat else None)
    engine = Engine(lm.model, PagedConfig(page_size=args.page_size, max_seqs=len(ids) * args.samples,
                                          max_model_len=max(map(len, ids)) + args.max_new_tokens,
                                          defer_budget=args.defer_budget),
                    eos_ids=lm.eos_ids, tokenizer=lm.tokenizer)
    owner = {}
    for i, p in enumerate(ids):
        for rid in engine.add_request(p, params, n=args.samples):
            owner[rid] = i
    for out in engine.stream():
        if out.token is None:  # ended without a token
            err = engine.outputs[out.request_id].error
            print(f"\ndms generate: request {out.request_id} ended ({out.finish_reason}): {err}", file=sys.stderr)
            continue
        piece = lm.tokenizer.decode([out.token], skip_special_tokens=True) if lm.tokenizer else f" {out.token}"
        print(f"[{owner[out.request_id]}:{out.request_id}] {piece!r}" if len(owner) > 1 else piece, end="" if len(owner) == 1 else "\n", flush=True)
    print()
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``dms retrofit: error: argument --steps: ...``), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# What a user can get wrong (settings, paths, files, the model's numbers): one line, exit 2. Anything
# else is a bug in this program and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, OSError, FloatingPointError)


def _one_line(exc: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="dms", description="Dynamic Memory Sparsification runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    from .retrofit import cli as retrofit_cli

    retrofit_cli.add_parser(sub)
    retrofit_cli.add_eval_parser(sub)
    from .serve import cli as serve_cli

    serve_cli.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            try:
                return _generate(args)
            finally:
                if getattr(args, "tensor_parallel", 1) > 1:
                    from .parallel import close

                    close()
        if args.command == "retrofit":
            return retrofit_cli.run(args)
        if args.command == "eval":
            return retrofit_cli.run_eval(args)
        if args.command == "serve":
            return serve_cli.run(args)
    except USER_ERRORS as e:
        print(f"dms {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dms {args.command}: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
