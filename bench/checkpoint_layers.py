"""What activation checkpointing (`dms retrofit --checkpoint-layers`) buys a retrofit step, and what
it costs: peak resident memory and seconds per step of the shipped CR 8 retrofit's training step
(LoRA update, bf16 autocast, as in its recipe), plain and checkpointed, one fresh process each so
every peak is its own.

    OMP_NUM_THREADS=2 .venv/bin/python bench/checkpoint_layers.py --seq-len 1024 2048 4096 \
        --plain-up-to 2048 --json bench/results/<date>-checkpoint-layers.json

A plain step keeps every layer's attention scores for the backward pass (memory grows with the
layers times the square of the sequence), so plain runs stop at --plain-up-to.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def one(model: str, init_from: str | None, lora_rank: int, seq_len: int, checkpoint: bool, steps: int) -> dict:
    """One process's measurement (the child side)."""
    import itertools

    import dms_runtime as dr
    from dms_runtime.retrofit import data
    from dms_runtime.retrofit.trainer import RetrofitConfig, Retrofitter

    dms = {"dms_window_size": 128, "dms_separate_alpha": True, "dms_cr": 8.0, "dms_sink_tokens": 4,
           "dms_lora_rank": lora_rank, "dms_lora_alpha": 16.0}
    lm = dr.load(model, dms=dms, merge_lora=False)
    seqs = data.pack(data.stdlib_documents(seed=7), lm.tokenizer, seq_len, eos_id=lm.tokenizer.eos_token_id)
    batches = [torch.tensor([s], dtype=torch.int64) for s in itertools.islice(seqs, steps)]
    cfg = RetrofitConfig(final_cr=8, initial_cr=8, window=128, lr=5e-6, lora_lr=5e-4, warmup_steps=1, seed=0,
                         init_from=init_from, autocast_bf16=True, checkpoint_layers=checkpoint)
    trainer = Retrofitter(lm.model, cfg)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    seconds, records = [], []
    for b in batches:
        t0 = time.perf_counter()
        records.append(trainer.step(b))
        seconds.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"seq_len": seq_len, "checkpoint_layers": checkpoint, "steps": steps, "seconds_per_step": seconds,
            "peak_rss_gib": round(peak, 2), "rss_after_load_gib": round(loaded, 2),
            "loss": [r["loss"] for r in records], "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--init-from", default="smollm2-135m-instruct-dms-cr8", help="'' for a fresh adapter")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--seq-len", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--plain-up-to", type=int, default=2048,
                    help="measure the plain step only up to this length (beyond it, checkpointed only)")
    ap.add_argument("--steps", type=int, default=2, help="steps per process (the first includes warm-up)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=2, metavar=("SEQ_LEN", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        row = one(args.model, args.init_from or None, args.lora_rank, int(args.child[0]), args.child[1] == "1",
                  args.steps)
        print(json.dumps(row))
        return
    rows = []
    for n in args.seq_len:
        for ckpt in (False, True):
            if not ckpt and n > args.plain_up_to:
                continue
            cmd = [sys.executable, __file__, "--model", args.model, "--init-from", args.init_from, "--lora-rank",
                   str(args.lora_rank), "--steps", str(args.steps), "--child", str(n), "1" if ckpt else "0"]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"seq {n:5d} {'checkpointed' if ckpt else 'plain':12s} peak {r['peak_rss_gib']:6.2f} GiB "
                  f"(after load {r['rss_after_load_gib']:.2f}), s/step {' '.join(f'{s:.1f}' for s in r['seconds_per_step'])}, "
                  f"loss {' '.join(f'{x:.5f}' for x in r['loss'])}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
