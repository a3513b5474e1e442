"""Decode on CPU: our engine (DMS CR 8, CR 4, vanilla) vs plain transformers, side by side in one run.

Same weights (the converted SmolLM2-135M-Instruct safetensors folder), same prompt tokens (seeded
random ids), greedy, fp32. Ours: ``dms_runtime.generate`` through the paged engine (attention
backend "auto": the fused CPU kernels where built). Transformers: ``LlamaForCausalLM`` from the
same folder, a ``DynamicCache`` and a plain greedy loop (prefill in one forward, then one token per
step). Both use all cores (``torch.set_num_threads``).

Per (length, batch) and system: prefill time, decode tokens/s, KV bytes read per decode step, and
the effective bytes/s of a decode step ((weights + KV read) / step time); ratios against
transformers of the same run.

    python bench/bench_cpu_decode.py --lengths 1024,4096,8192 --batch 1,8 --decode-tokens 64 \\
        --json bench/results/cpu-decode.json --render bench/results/cpu-decode.md
    python bench/bench_cpu_decode.py --lengths 1024 --batch 1 --decode-tokens 8   # smoke run
    python bench/bench_cpu_decode.py --lengths 1024 --batch 1 --systems dms-cr8,lora,transformers \
        --model lora=bench/runs/cr8-lora16     # any model or retrofit folder as one more system of ours
    python bench/bench_cpu_decode.py --lengths 1024 --batch 1 --systems lora,lora-apart,transformers \
        --model lora=R --model lora-apart=R --lora-apart lora-apart   # a LoRA update merged vs kept apart
    python bench/bench_cpu_decode.py --lengths 4096 --batch 1 --systems dms-cr8,cr8-deferred,transformers \
        --model cr8-deferred=smollm2-135m-instruct-dms-cr8 --defer cr8-deferred=576   # deferred eviction
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

import dms_runtime as dr
from dms_runtime.models.lora import has_merged_lora, is_lora_parameter
from dms_runtime.paged import PagedConfig

OURS = {"dms-cr8": "smollm2-135m-instruct-dms-cr8", "dms-cr4": "smollm2-135m-instruct-dms-cr4",
        "vanilla": "smollm2-135m-instruct"}
SYSTEMS = (*OURS, "transformers")
APART: set[str] = set()  # systems loaded with merge_lora=False (--lora-apart)
DEFER: dict[str, int] = {}  # systems run with PagedConfig.defer_budget (--defer)


def prompts_for(length: int, batch: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed + length)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters a decode step reads (tied weights counted once; a merged LoRA
    update's factors are not read)."""
    merged = has_merged_lora(model)
    seen, total = set(), 0
    for n, p in model.named_parameters():
        if merged and is_lora_parameter(n):
            continue
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def run_ours(name: str, prompts, decode_tokens: int, chunk: int) -> dict:
    lm = dr.load(OURS[name], merge_lora=name not in APART)
    cfg = PagedConfig(max_seqs=len(prompts), prefill_chunk=chunk, defer_budget=DEFER.get(name, 0))
    t0 = time.perf_counter()
    res = dr.generate(lm, prompts, max_new_tokens=decode_tokens + 1, ignore_eos=True, paged=cfg)
    wall = time.perf_counter() - t0
    st = res.stats
    steps = st.extra["decode_steps"]
    step_s = st.decode_s / max(steps, 1)
    kv = st.extra["kv_bytes_read_per_decode_step"]
    w = weight_bytes(lm.model)
    return {"prefill_s": st.prefill_s, "decode_tok_s": st.decode_tokens_per_s, "decode_steps": steps,
            "step_ms": step_s * 1e3, "kv_bytes_per_step": kv, "weight_bytes": w,
            "bytes_per_s": (w + kv) / max(step_s, 1e-12), "backend": st.backend, "wall_s": wall,
            "compression": st.kv.compression_ratio, "defer_budget": st.extra["defer_budget"],
            "kv_peak_bytes": st.extra["pool_peak_bytes"], "tokens": [o.token_ids for o in res.outputs]}


@torch.inference_mode()
def run_transformers(folder: Path, prompts, decode_tokens: int) -> dict:
    from transformers import DynamicCache, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    cfg = model.config
    ids = torch.tensor(prompts)
    b, length = ids.shape
    cache = DynamicCache()
    t0 = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    prefill = time.perf_counter() - t0
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [tok]
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(tok)
    decode = time.perf_counter() - t0
    step_s = decode / max(decode_tokens, 1)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    mean_ctx = length + (decode_tokens + 1) / 2  # positions read, averaged over the decode steps
    token_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    kv = int(token_bytes * mean_ctx * b)
    w = weight_bytes(model)
    return {"prefill_s": prefill, "kv_peak_bytes": token_bytes * (length + decode_tokens) * b, "decode_tok_s": b * decode_tokens / max(decode, 1e-12), "decode_steps": decode_tokens,
            "step_ms": step_s * 1e3, "kv_bytes_per_step": kv, "weight_bytes": w,
            "bytes_per_s": (w + kv) / max(step_s, 1e-12), "backend": "transformers/DynamicCache",
            "tokens": torch.cat(tokens, 1).tolist()}


def render(record: dict) -> str:
    lines = [f"`{record['command']}`", "",
             f"{record['machine']}, {record['threads']} threads, torch {record['torch']}, commit {record['commit']}, "
             f"{record['decode_tokens']} decode tokens, fp32, greedy", "",
             "| length | batch | system | backend | prefill s | decode tok/s | x transformers | KV MB held (peak) "
             "| KV MB read / step | GB/s (weights + KV) | x transformers |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in record["rows"]:
        base = next(r for r in record["rows"] if r["length"] == row["length"] and r["batch"] == row["batch"]
                    and r["system"] == "transformers")
        lines.append(
            f"| {row['length']} | {row['batch']} | {row['system']} | {row['backend']} | {row['prefill_s']:.2f} "
            f"| {row['decode_tok_s']:.2f} | {row['decode_tok_s'] / base['decode_tok_s']:.2f}x "
            f"| {row.get('kv_peak_bytes', float('nan')) / 1e6:.1f} | {row['kv_bytes_per_step'] / 1e6:.1f} | {row['bytes_per_s'] / 1e9:.2f} "
            f"| {row['bytes_per_s'] / base['bytes_per_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,4096,8192", help="prompt lengths (tokens)")
    ap.add_argument("--batch", default="1,8", help="batch sizes")
    ap.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per sequence after the first")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)}")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", action="append", default=[], metavar="LABEL=MODEL",
                    help="one more system of ours: a model name or folder (a retrofit folder too), named LABEL")
    ap.add_argument("--lora-apart", nargs="+", default=[], metavar="LABEL",
                    help="load these --model systems with the LoRA update kept apart (merge_lora=False)")
    ap.add_argument("--defer", nargs="+", default=[], metavar="LABEL=TOKENS",
                    help="run these --model systems with deferred eviction (PagedConfig.defer_budget=TOKENS)")
    ap.add_argument("--json", type=Path, help="write the record here")
    ap.add_argument("--render", type=Path, help="write the markdown table here")
    args = ap.parse_args()
    for spec in args.model:
        label, sep, model = spec.partition("=")
        if not sep or not label or not model or label in SYSTEMS:
            raise SystemExit(f"--model: expected LABEL=MODEL with a new label, got {spec!r}")
        OURS[label] = model
    for label in args.lora_apart:
        if label not in OURS or label in SYSTEMS:
            raise SystemExit(f"--lora-apart: expected a label given with --model, got {label!r}")
        APART.add(label)
    for spec in args.defer:
        label, sep, tokens = spec.partition("=")
        if not sep or label not in OURS or label in SYSTEMS or not tokens.isdigit():
            raise SystemExit(f"--defer: expected LABEL=TOKENS for a label given with --model, got {spec!r}")
        DEFER[label] = int(tokens)
    systems = args.systems.split(",")
    for s in systems:
        if s not in (*SYSTEMS, *OURS):
            raise SystemExit(f"--systems: unknown {s!r}; expected some of {', '.join((*SYSTEMS, *OURS))}")
    if "transformers" not in systems:
        raise SystemExit("--systems: the ratios need 'transformers'")
    torch.set_num_threads(args.threads)
    from dms_runtime.hub import resolve

    folder, _ = resolve("smollm2-135m-instruct")
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    rows = []
    for length in map(int, args.lengths.split(",")):
        for batch in map(int, args.batch.split(",")):
            prompts = prompts_for(length, batch, vocab, args.seed)
            for system in systems:
                if system == "transformers":
                    r = run_transformers(Path(folder), prompts, args.decode_tokens)
                else:
                    r = run_ours(system, prompts, args.decode_tokens, args.prefill_chunk)
                tokens = r.pop("tokens")
                r.update(length=length, batch=batch, system=system)
                if system in ("vanilla", "transformers"):
                    r["first_tokens"] = [t[:8] for t in tokens]
                rows.append(r)
                print(f"L={length:>5} B={batch} {system:>12} ({r['backend']}): prefill {r['prefill_s']:.2f} s, "
                      f"decode {r['decode_tok_s']:.2f} tok/s ({r['step_ms']:.1f} ms/step), "
                      f"KV {r['kv_bytes_per_step'] / 1e6:.1f} MB/step, {r['bytes_per_s'] / 1e9:.2f} GB/s", flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python bench/bench_cpu_decode.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in (("lengths", args.lengths), ("batch", args.batch),
                                                               ("decode_tokens", args.decode_tokens),
                                                               ("threads", args.threads), ("systems", args.systems)))
              + "".join(f" --model {m}" for m in args.model)
              + (f" --lora-apart {' '.join(args.lora_apart)}" if args.lora_apart else "")
              + (f" --defer {' '.join(args.defer)}" if args.defer else ""),
              "machine": f"{platform.machine()} {platform.processor() or ''} ({os.cpu_count()} cores)".strip(),
              "threads": args.threads, "torch": torch.__version__, "commit": commit,
              "decode_tokens": args.decode_tokens, "rows": rows}
    table = render(record)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
    if args.render:
        args.render.parent.mkdir(parents=True, exist_ok=True)
        args.render.write_text(table)


if __name__ == "__main__":
    main()
