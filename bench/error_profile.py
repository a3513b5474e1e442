"""Where a method's next-token errors fall: DMS and the heuristic policies per token, on held-out text.

``dms eval`` reports the mean KL and greedy agreement; two methods with the same mean KL can differ
in agreement when one spreads its error thinly and the other concentrates it on a few tokens. This
runs vanilla, DMS and each ``--policy`` at DMS's budget (its peak KV held, as ``dms eval`` does) on
the same held-out texts and prints, per method, the per-token KL's quantiles, the share of the
total KL carried by the worst 1% / 5% of tokens, greedy agreement where vanilla is confident
(top-1 probability >= 0.9) and where it is not, and how confident vanilla was at the tokens a
method gets wrong, and KL and agreement split at the budget: a heuristic with a fixed budget holds
every key until the text is that long, so its tokens before that point are exact. Each policy's
agreement and KL after the budget fills also come as a paired gap to DMS's on the same positions (policy
minus DMS) with the 95% block-bootstrap interval of ``dms eval``.

    .venv/bin/python bench/error_profile.py -m smollm2-135m-instruct-dms-cr8 --length 2048 --sequences 4 \
        --policy h2o --json bench/results/....json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from dms_runtime import load
from dms_runtime.validation import add_dms_overrides, dms_overrides
from dms_runtime.retrofit.evaluate import (forward_ids, fidelity, heldout_sequences, paired_gap, token_scores,
                                           vanilla_logits)
from dms_runtime.retrofit.policies import POLICIES, PolicyAttention, policy_budget
from dms_runtime.retrofit.training_backend import eviction_off


def profile(kl: torch.Tensor, wrong: torch.Tensor, top1: torch.Tensor, filled: torch.Tensor) -> dict:
    """Per-token KL ``[N]``, greedy mismatch ``[N]`` bool, vanilla's top-1 probability ``[N]`` and
    whether the token's query came after the budget filled ``[N]`` bool (position >= budget: before,
    a policy with a fixed budget holds every key, so its error there is zero)."""
    srt = kl.sort(descending=True).values
    total = float(kl.sum())
    n = kl.numel()
    confident = top1 >= 0.9
    return {
        "tokens": n,
        "kl_mean": total / n,
        "kl_p50": float(kl.quantile(0.5)), "kl_p90": float(kl.quantile(0.9)), "kl_p99": float(kl.quantile(0.99)),
        "kl_share_worst_1pct": float(srt[: max(1, math.ceil(0.01 * n))].sum()) / total if total else 0.0,
        "kl_share_worst_5pct": float(srt[: max(1, math.ceil(0.05 * n))].sum()) / total if total else 0.0,
        "agreement": 1.0 - float(wrong.float().mean()),
        "agreement_vanilla_confident": 1.0 - float(wrong[confident].float().mean()),
        "agreement_vanilla_unsure": 1.0 - float(wrong[~confident].float().mean()),
        "vanilla_confident_fraction": float(confident.float().mean()),
        "wrong_where_vanilla_confident": float((wrong & confident).sum()) / max(1, int(wrong.sum())),
        "vanilla_top1_at_wrong_p50": float(top1[wrong].median()) if wrong.any() else None,
        "after_budget_fraction": float(filled.float().mean()),
        "kl_mean_before_budget": float(kl[~filled].mean()) if (~filled).any() else None,
        "kl_mean_after_budget": float(kl[filled].mean()) if filled.any() else None,
        "agreement_before_budget": 1.0 - float(wrong[~filled].float().mean()) if (~filled).any() else None,
        "agreement_after_budget": 1.0 - float(wrong[filled].float().mean()) if filled.any() else None,
    }


@torch.inference_mode()
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", required=True, help="DMS model: embedded name, folder or retrofit folder")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--policy", nargs="*", choices=POLICIES, default=["h2o"])
    add_dms_overrides(p)
    p.add_argument("--json", type=Path, help="also write the rows here")
    a = p.parse_args(argv)
    lm = load(a.model, dms=dms_overrides(a) or None, merge_lora=False)  # exact base logits, as dms eval
    seqs = heldout_sequences(lm, a.length, a.sequences)
    vanilla = vanilla_logits(lm, seqs)
    per: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"dms": [], **{x: [] for x in a.policy}}
    row = fidelity(lm, a.length, a.sequences, vanilla=vanilla, scores=per["dms"])  # (KL, agreement) per position
    budget = policy_budget(row.peak_live_fraction, a.length)
    top1 = []
    for s, van in zip(seqs, vanilla):
        top1.append(F.softmax(van.float(), -1).amax(-1)[0])
        with eviction_off(lm.model):
            for pol in a.policy:
                per[pol].append(token_scores(forward_ids(lm.model, s, PolicyAttention(pol, budget)), van))
    top = torch.cat(top1)
    filled = torch.cat([torch.arange(len(x)) >= budget for x in seqs])
    rows = []
    for method, parts in per.items():
        kl, wrong = torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]) == 0
        rows.append({"method": method, "model": a.model, "length": a.length, "sequences": a.sequences,
                     "budget": budget, "held_fraction": row.peak_live_fraction, **profile(kl, wrong, top, filled)})
        if method != "dms" and budget < a.length:  # after the fill, position by position against DMS
            rows[-1]["kl_gap_after_budget"] = paired_gap([x[budget:] for x, _ in per["dms"]],
                                                         [x[budget:] for x, _ in parts])
            rows[-1]["agreement_gap_after_budget"] = paired_gap([y[budget:] for _, y in per["dms"]],
                                                                [y[budget:] for _, y in parts])
    cols = ["method", "kl_mean", "kl_p50", "kl_p90", "kl_p99", "kl_share_worst_1pct", "kl_share_worst_5pct",
            "agreement", "agreement_vanilla_confident", "agreement_vanilla_unsure", "wrong_where_vanilla_confident",
            "kl_mean_before_budget", "kl_mean_after_budget", "agreement_before_budget", "agreement_after_budget"]
    print(f"{a.model} at {a.length}, {a.sequences} texts, budget {budget} ({row.peak_live_fraction:.3f}); "
          f"vanilla confident (top-1 >= 0.9) at {rows[0]['vanilla_confident_fraction']:.1%} of tokens")
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in rows:
        print("| " + " | ".join(r[c] if isinstance(r[c], str) else "-" if r[c] is None else f"{r[c]:.4g}"
                                for c in cols) + " |")
    for r in rows:
        if "agreement_gap_after_budget" in r:
            print("{} - DMS after the budget fills: agreement {:+.2f} points [{:+.2f}, {:+.2f}], ".format(
                r["method"], *(100 * g for g in r["agreement_gap_after_budget"]))
                + "KL {:+.4f} [{:+.4f}, {:+.4f}] (95%)".format(*r["kl_gap_after_budget"]))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
