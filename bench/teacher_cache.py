"""What the cached teacher buys a retrofit step, and what its top-k loss gives up, measured side by
side in one process on real training batches of the embedded SmolLM2 (adapter variant, CR 8):

- seconds per step with the teacher's forward pass (no cache), on a cache miss (forward + top-k
  written) and on a hit (student only), each on the same batches;
- the top-k + tail KL against the full-vocabulary KL for the same student and teacher logits, for
  several k, and the size of one cache entry.

    OMP_NUM_THREADS=2 .venv/bin/python bench/teacher_cache.py --json bench/results/<date>-teacher-cache.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import dms_runtime as dr
from dms_runtime.models.full_sequence import FullSequenceAttention
from dms_runtime.retrofit import data
from dms_runtime.retrofit.losses import TopK, distillation_kl, topk_kl
from dms_runtime.retrofit.teacher_cache import CacheKey, TeacherCache
from dms_runtime.retrofit.trainer import RetrofitConfig, Retrofitter
from dms_runtime.retrofit.training_backend import TrainingAttention, eviction_off


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--init-from", default="bench/runs/shipped-v1-cr8")  # the adapter-only CR 8
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--top-k", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    dms = {"dms_window_size": 128, "dms_separate_alpha": True, "dms_cr": 8.0}
    lm = dr.load(args.model, dms=dms)
    seqs = data.pack(data.stdlib_documents(seed=7), lm.tokenizer, args.seq_len, eos_id=lm.tokenizer.eos_token_id)
    batches = [torch.tensor([s], dtype=torch.int64) for s in itertools.islice(seqs, args.batches)]
    cfg = RetrofitConfig(final_cr=8, initial_cr=8, window=128, lr=2e-5, warmup_steps=1, seed=0,
                         init_from=args.init_from, autocast_bf16=True)
    k_cache = 64

    def timed(trainer) -> list[float]:
        out = []
        for b in batches:
            t0 = time.perf_counter()
            trainer.step(b)
            out.append(time.perf_counter() - t0)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        key = CacheKey(base_model=args.model, k=k_cache, vocab=lm.config.vocab_size, dtype="float32",
                       autocast_bf16=True)
        fresh = lambda cache: Retrofitter(dr.load(args.model, dms=dms).model, cfg, teacher_cache=cache)  # noqa: E731
        plain = timed(fresh(None))
        miss = timed(fresh(TeacherCache(tmp, key)))
        hit = timed(fresh(TeacherCache(tmp, key)))
        entry_bytes = statistics.mean(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))

    # the loss: the same student (training attention, CR 8 adapter) and teacher logits, full vs top-k
    model = fresh(None).model
    kl_rows = []
    for b in batches:
        pos = torch.arange(b.shape[1]).expand_as(b)
        lengths = torch.tensor([b.shape[1]])
        with torch.no_grad():
            with eviction_off(model):
                teacher = model(b, pos, FullSequenceAttention(lengths=lengths))
            student = model(b, pos, TrainingAttention(128, 0.1, torch.Generator().manual_seed(0), lengths))
        row = {"full": distillation_kl(student, teacher).item()}
        for k in args.top_k:
            row[f"top{k}"] = topk_kl(student, TopK.from_logits(teacher, k)).item()
        kl_rows.append(row)

    result = {
        "model": args.model, "init_from": args.init_from, "seq_len": args.seq_len, "batches": args.batches,
        "threads": torch.get_num_threads(), "cache_top_k": k_cache, "entry_bytes": int(entry_bytes),
        "seconds_per_step": {"no_cache": statistics.median(plain), "miss": statistics.median(miss),
                             "hit": statistics.median(hit)},
        "hit_speedup": statistics.median(plain) / statistics.median(hit),
        "kl": {name: statistics.mean(r[name] for r in kl_rows) for name in kl_rows[0]},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
