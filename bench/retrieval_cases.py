"""Retrieval cases one at a time, resumable: one method on the seeded cases of ``dms eval --retrieval``.

``dms eval`` runs vanilla, DMS and every policy on all cases of a length in one go; at 4K and 8K on
a CPU a policy takes minutes per case, more than one sitting holds. This runs a single method
(``vanilla``, ``dms``, DMS deferred to a budget, or a policy at a given budget) case by case and appends one JSON line per case
to ``--out``; run it again with the same arguments and it continues after the last case written.
The cases are the suite's (``retrieval.make_cases``), so the lines compare with ``dms eval`` rows.

    .venv/bin/python bench/retrieval_cases.py -m smollm2-135m-instruct-dms-cr8 --task passkey \
        --length 4096 --method streaming --budget 0.142 --out bench/results/....jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dms_runtime import load
from dms_runtime.retrofit.policies import POLICIES
from dms_runtime.validation import add_dms_overrides, dms_overrides
from dms_runtime.retrofit.retrieval import TASKS, generate_answers, make_cases, policy_answers, score


@torch.inference_mode()
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", required=True, help="DMS model: embedded name, folder or retrofit folder")
    p.add_argument("--task", choices=TASKS, default="passkey")
    p.add_argument("--length", type=int, required=True)
    p.add_argument("--method", choices=("vanilla", "dms") + POLICIES, required=True)
    p.add_argument("--budget", type=float, help="a policy's KV budget: the fraction of the prompt held; with "
                   "--method dms, DMS with deferred eviction at that budget (PagedConfig.defer_budget)")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    add_dms_overrides(p)
    p.add_argument("--out", type=Path, required=True, help="JSON lines, one per case (appended)")
    a = p.parse_args(argv)
    if a.method in POLICIES and not (a.budget and 0.0 < a.budget <= 1.0):
        p.error(f"--budget: a policy needs a fraction in (0, 1], got {a.budget!r}")
    if a.method == "vanilla" and a.budget is not None or a.method == "dms" and a.budget is not None \
            and not 0.0 < a.budget <= 1.0:
        p.error(f"--budget: expected none for vanilla, a fraction in (0, 1] for deferred DMS, got {a.budget!r}")
    lm = load(a.model, dms=dms_overrides(a) or None)
    cases = make_cases(lm.tokenizer, a.task, a.length, a.cases, a.seed, context=lm.config.max_position_embeddings)
    run = {"model": a.model, "task": a.task, "length": a.length, "method": a.method, "budget": a.budget,
           "cases": a.cases, "seed": a.seed, "dms_window": a.dms_window, "dms_sinks": a.dms_sinks, "dms_offset": a.dms_offset}
    done = 0
    if a.out.is_file():
        old = [json.loads(x) for x in a.out.read_text().splitlines() if x.strip()]
        for j, r in enumerate(old):
            theirs = {k: r.get(k) for k in run}
            if r.get("case") != j or theirs != run:
                p.error(f"--out: line {j + 1} of {a.out} is case {r.get('case')} of another run ({theirs}); "
                        f"this run is {run}: give a new file")
        done = len(old)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for i in range(done, len(cases)):
        c, t0 = cases[i], time.perf_counter()
        if a.method in ("vanilla", "dms"):
            texts, held = generate_answers(lm, [c], evict=a.method == "dms",
                                           defer_fraction=a.budget if a.method == "dms" else None)
        else:
            texts, helds = policy_answers(lm, [c], a.method, a.budget)
            held = helds[0]
        row = {**run, "case": i, "depth": c.depth, "correct": score(c.task, c.answers, texts[0]), "held": held,
               "text": texts[0], "s": time.perf_counter() - t0}
        with a.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    rows = [json.loads(x) for x in a.out.read_text().splitlines() if x.strip()]
    print(f"{a.method} {a.task} {a.length}: {sum(r['correct'] for r in rows):g}/{len(rows)} "
          f"(held {sum(r['held'] for r in rows) / len(rows):.3f})")


if __name__ == "__main__":
    main()
