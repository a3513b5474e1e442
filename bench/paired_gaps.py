"""How sure a gap between DMS and a heuristic is: paired gaps at several bootstrap block lengths, and by text.

``dms eval --policy`` reports each policy's KL and greedy agreement minus DMS's on the same positions,
with a 95% interval from a bootstrap over blocks of 512 positions. That interval is honest only if
blocks that long are nearly independent. This scores DMS and each ``--policy`` (at DMS's peak KV
held over all the texts, as ``dms eval`` does) on ``--sequences`` held-out texts, one text's logits
in memory at a time (so many texts fit), and prints the gap's interval for each ``--blocks`` length
(a block of the whole text resamples texts) next to each text's own gap. If the interval still
widens at the longest blocks, the texts differ more than their positions do, and only more texts
narrow it.

    .venv/bin/python bench/paired_gaps.py -m smollm2-135m-instruct-dms-cr8 --length 2048 --sequences 16 \\
        --policy streaming tova h2o --json bench/results/....json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dms_runtime import load
from dms_runtime.models.full_sequence import FullSequenceAttention
from dms_runtime.retrofit.evaluate import (fidelity, forward_ids, heldout_sequences, paired_gap, token_scores,
                                           vanilla_logits)
from dms_runtime.retrofit.policies import POLICIES, PolicyAttention, policy_budget
from dms_runtime.retrofit.training_backend import eviction_off
from dms_runtime.validation import add_dms_overrides, dms_overrides


def score(lm, length: int, sequences: int, policies) -> tuple[int, float, dict[str, list[tuple[torch.Tensor, ...]]]]:
    """DMS's and each policy's per-position :func:`token_scores` on the first ``sequences`` held-out
    texts; the policies at DMS's peak held over all of them. Returns (budget, DMS's peak held, scores)."""
    seqs = heldout_sequences(lm, length, sequences)
    per = {"dms": [], **{p: [] for p in policies}}
    peak = 0.0
    for s in seqs:  # DMS first: the policies' budget is its peak over every text
        row = fidelity(lm, length, 1, vanilla=vanilla_logits(lm, [s]), scores=per["dms"], texts=[s])
        peak = max(peak, row.peak_live_fraction)
    budget = policy_budget(peak, length)
    with torch.inference_mode(), eviction_off(lm.model):
        for s in seqs:
            van = forward_ids(lm.model, s, FullSequenceAttention())
            for p in policies:
                per[p].append(token_scores(forward_ids(lm.model, s, PolicyAttention(p, budget)), van))
    return budget, peak, per


def gaps(per: dict, blocks) -> list[dict]:
    """Per policy: its means, each text's gap to DMS, and the paired gap with its interval per block length."""
    rows = []
    dms = per["dms"]
    for method, parts in per.items():
        row = {"method": method,
               "kl_per_token": sum(k.mean().item() for k, _ in parts) / len(parts),
               "greedy_agreement": sum(h.mean().item() for _, h in parts) / len(parts)}
        if method != "dms":
            row["agreement_gap_by_text"] = [(h.mean() - d.mean()).item() for (_, h), (_, d) in zip(parts, dms)]
            row["kl_gap_by_text"] = [(k.mean() - d.mean()).item() for (k, _), (d, _) in zip(parts, dms)]
            row["agreement_gap"] = {b: paired_gap([d for _, d in dms], [h for _, h in parts], block=b, min_blocks=1)
                                    for b in blocks}
            row["kl_gap"] = {b: paired_gap([d for d, _ in dms], [k for k, _ in parts], block=b, min_blocks=1)
                             for b in blocks}
        rows.append(row)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", required=True, help="DMS model: embedded name, folder or retrofit folder")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--policy", nargs="+", choices=POLICIES, default=["h2o"])
    p.add_argument("--blocks", type=int, nargs="+", default=None,
                   help="bootstrap block lengths in positions (default: 1 32 128 512 and the whole text)")
    add_dms_overrides(p)
    p.add_argument("--json", type=Path, help="also write the rows here")
    a = p.parse_args(argv)
    blocks = a.blocks or sorted({b for b in (1, 32, 128, 512) if b < a.length} | {a.length})
    if any(b < 1 for b in blocks):
        raise SystemExit(f"--blocks: expected lengths >= 1, got {blocks}")
    lm = load(a.model, dms=dms_overrides(a) or None, merge_lora=False)
    budget, peak, per = score(lm, a.length, a.sequences, a.policy)
    rows = gaps(per, blocks)
    print(f"{a.model} at {a.length}, {a.sequences} texts; the policies at {budget} tokens per head ({peak:.3f} held)")
    for r in rows:
        print(f"{r['method']:>10}: KL {r['kl_per_token']:.4f}, agreement {100 * r['greedy_agreement']:.2f}%")
        if r["method"] == "dms":
            continue
        print("    agreement - DMS by text, points: " + " ".join(f"{100 * g:+.2f}" for g in r["agreement_gap_by_text"]))
        for b in blocks:
            g, lo, hi = (100 * x for x in r["agreement_gap"][b])
            k, klo, khi = r["kl_gap"][b]
            print(f"    block {b:>5}: agreement {g:+.2f} [{lo:+.2f}, {hi:+.2f}]   KL {k:+.4f} [{klo:+.4f}, {khi:+.4f}]")
    if a.json:
        a.json.write_text(json.dumps({"model": a.model, "length": a.length, "sequences": a.sequences,
                                      "budget": budget, "held_fraction": peak, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
