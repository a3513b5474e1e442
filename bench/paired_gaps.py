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

Many texts: runs over disjoint ranges (``--skip``) at one ``--budget`` (the policies' KV tokens per head,
e.g. the first run's), each saving after every text, then ``--merge`` (intervals resample whole texts):

    .venv/bin/python bench/paired_gaps.py -m ... --length 2048 --skip 16 --sequences 62 --budget 364 \\
        --policy streaming tova h2o --blocks 512 2048 --json part2.json
    .venv/bin/python bench/paired_gaps.py --merge part1.json part2.json --json all.json

DMS with its evictions deferred until a pool of the policies' size fills (``--defer``; the policies' gaps
taken from earlier runs over the same texts with ``--against``, so only DMS is scored):

    .venv/bin/python bench/paired_gaps.py -m ... --length 2048 --skip 16 --sequences 62 --budget 364 --defer \\
        --against part1.json part2.json --json deferred.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dms_runtime import load
from dms_runtime.models.full_sequence import FullSequenceAttention
from dms_runtime.retrofit.deferred import DeferredAttention, deferred_forward
from dms_runtime.retrofit.evaluate import (fidelity, forward_ids, heldout_sequences, heldout_sources, paired_gap,
                                           token_scores, vanilla_logits)
from dms_runtime.retrofit.policies import POLICIES, PolicyAttention, policy_budget, policy_reads
from dms_runtime.retrofit.training_backend import eviction_off
from dms_runtime.validation import add_dms_overrides, dms_overrides


def score(lm, length: int, sequences: int, policies, skip: int = 0, budget: int | None = None,
          each=None, defer: bool = False, reads: dict | None = None, order: str = "oldest"
          ) -> tuple[int, float, dict[str, list[tuple[torch.Tensor, ...]]]]:
    """DMS's and each policy's per-position :func:`token_scores` on held-out texts ``skip`` to
    ``skip + sequences - 1``; the policies at ``budget`` KV tokens per head, or (None) at DMS's peak held
    over all of these texts. ``defer``: "dms" is DMS with its evictions deferred until a pool of ``budget``
    tokens per list fills (:mod:`dms_runtime.retrofit.deferred`), and "undeferred" is DMS itself; ``reads``
    then receives each one's K/V tokens read per text, as a fraction of dense attention's; ``order``: which
    marked keys the pool drops first (``DeferredAttention``: the oldest, or those with the largest logit).
    ``each(budget, peak, scores)`` is called after every text once the budget is known. Returns (budget,
    DMS's peak held, scores)."""
    if defer and budget is None:
        raise ValueError("budget: deferring needs the pool's size, in KV tokens per list")
    seqs = heldout_sequences(lm, length, skip + sequences)[skip:]
    per = {"dms": [], **({"undeferred": []} if defer else {}), **{p: [] for p in policies}}
    peak = 0.0
    if budget is None:  # DMS first: the policies' budget is its peak over every text
        for s in seqs:
            row = fidelity(lm, length, 1, vanilla=vanilla_logits(lm, [s]), scores=per["dms"], texts=[s])
            peak = max(peak, row.peak_live_fraction)
        budget = policy_budget(peak, length)
    lists = lm.config.num_layers * lm.config.num_kv_heads
    for i, s in enumerate(seqs):
        van = vanilla_logits(lm, [s])[0]
        if defer:
            for name, pool in (("dms", budget * lists), ("undeferred", 0)):
                logits, backend = deferred_forward(lm.model, s, lm.config.dms.window_size, pool, order=order)
                per[name].append(token_scores(logits, van))
                if reads is not None:
                    reads.setdefault(name, []).append(backend.reads / (lists * length * (length + 1) / 2))
                if name == "dms":
                    peak = max(peak, backend.held_peak / (length * lists))
        elif len(per["dms"]) <= i:  # a given budget: DMS text by text beside the policies
            row = fidelity(lm, length, 1, vanilla=[van], scores=per["dms"], texts=[s])
            peak = max(peak, row.peak_live_fraction)
        with torch.inference_mode(), eviction_off(lm.model):
            for p in policies:
                per[p].append(token_scores(forward_ids(lm.model, s, PolicyAttention(p, budget)), van))
        if each is not None:
            each(budget, peak, per)
    return budget, peak, per


def gaps(per: dict, blocks, budget: int | None = None) -> list[dict]:
    """Per method: its means and each text's; per policy also each text's gap to DMS and the paired gap with
    its interval per block length; with ``budget``, the same over the positions after the policies' budget
    fills (position >= budget: before it a policy holds every key)."""
    rows = []
    dms = per["dms"]
    for method, parts in per.items():
        row = {"method": method,
               "kl_per_token": sum(k.mean().item() for k, _ in parts) / len(parts),
               "greedy_agreement": sum(h.mean().item() for _, h in parts) / len(parts),
               "kl_by_text": [k.mean().item() for k, _ in parts],
               "agreement_by_text": [h.mean().item() for _, h in parts]}
        after = budget is not None and budget < len(parts[0][0])
        if after:
            row["kl_after_fill"] = sum(k[budget:].mean().item() for k, _ in parts) / len(parts)
            row["agreement_after_fill"] = sum(h[budget:].mean().item() for _, h in parts) / len(parts)
        if method != "dms":
            for i, g in ((1, "agreement_gap"), (0, "kl_gap")):
                mine, base = [x[i] for x in parts], [x[i] for x in dms]
                row[f"{g}_by_text"] = [(m.mean() - d.mean()).item() for m, d in zip(mine, base)]
                row[g] = {b: paired_gap(base, mine, block=b, min_blocks=1) for b in blocks}
                if after:
                    mine, base = [m[budget:] for m in mine], [d[budget:] for d in base]
                    row[f"{g}_after_fill_by_text"] = [(m.mean() - d.mean()).item() for m, d in zip(mine, base)]
                    row[f"{g}_after_fill"] = {b: paired_gap(base, mine, block=b, min_blocks=1) for b in blocks}
        rows.append(row)
    return rows


GAPS = ("agreement_gap", "kl_gap", "agreement_gap_after_fill", "kl_gap_after_fill")


def text_interval(by_text: list[float]) -> list[float]:
    """A gap's mean over texts and its 95% interval from resampling whole texts (one gap per text)."""
    t = torch.tensor(by_text, dtype=torch.float64)
    return paired_gap([torch.zeros_like(t)], [t], block=1, min_blocks=1)


def earlier_gaps(earlier: list[dict], model: str, length: int, budget: int, first: int, n: int) -> dict:
    """From ``--json`` files of runs without deferring (same model, length, budget): each policy's per-text
    gaps to DMS (``{policy: {gap: [texts first .. first + n - 1]}}``; after-fill gaps where every text has
    them), and DMS's per-text KL where a run kept it (``{text: kl}``)."""
    out: dict = {}
    dms_kl: dict = {}
    for d in earlier:
        if d.get("defer") or "texts" in d:
            raise ValueError("expected --json files of runs without --defer (not merges)")
        if (d["model"], d["length"], d["budget"]) != (model, length, budget):
            raise ValueError(f"expected model, length, budget {model}, {length}, {budget}, got "
                             f"{d['model']}, {d['length']}, {d['budget']}")
        skip = d.get("skip", 0)
        for r in d["rows"]:
            if r["method"] == "dms":
                dms_kl.update((skip + k, v) for k, v in enumerate(r.get("kl_by_text", [])))
                continue
            for g in GAPS:
                for k, v in enumerate(r.get(f"{g}_by_text", [])):
                    out.setdefault(r["method"], {}).setdefault(g, {})[skip + k] = v
    for policy, by in out.items():
        for g in GAPS:
            if all(t in by.get(g, {}) for t in range(first, first + n)):
                by[g] = [by[g][t] for t in range(first, first + n)]
            elif g.endswith("after_fill"):
                by.pop(g, None)  # runs without after-fill gaps
            else:
                raise ValueError(f"no {policy} {g} for every text {first}..{first + n - 1}")
    return out, dms_kl


AGAINST_TOLERANCE = 1e-4  # DMS scored here and in the earlier runs: the same up to float noise


class AgainstMismatch(ValueError):
    """The earlier runs scored another DMS (model or setting) than this run."""


def against(res: dict, earlier: list[dict]) -> dict:
    """``res`` (a deferred run: "dms" deferred, "undeferred" DMS itself) with each policy of ``earlier``
    (:func:`earlier_gaps`) as a row: its gap to the deferred DMS on each text is its gap to DMS there plus
    DMS's gap to the deferred DMS here (both runs score DMS; ``undeferred_check`` is the largest difference
    between their DMS per-text KL, where the earlier run kept it). Intervals resample whole texts."""
    if not res.get("defer"):
        raise ValueError("--against: expected a deferred run (--defer)")
    first, n = res["skip"], res["sequences"]
    found, dms_kl = earlier_gaps(earlier, res["model"], res["length"], res["budget"], first, n)
    rows = {r["method"]: r for r in res["rows"]}
    base, shift = rows["dms"], rows["undeferred"]
    check = max((abs(dms_kl[first + k] - v) for k, v in enumerate(shift["kl_by_text"]) if first + k in dms_kl),
                default=0.0)
    if check > AGAINST_TOLERANCE:  # another model or setting (--dms-offset ...): the earlier gaps do not apply
        raise AgainstMismatch(f"expected runs of this model with these settings: DMS's per-text KL here differs from "
                         f"theirs by up to {check:.2e} (more than {AGAINST_TOLERANCE:.0e})")
    out = list(res["rows"])
    for policy, by in found.items():
        row = {"method": policy}
        for g, old in by.items():  # policy - DMS, plus DMS - deferred DMS
            row[f"{g}_by_text"] = [x + y for x, y in zip(old, shift[f"{g}_by_text"])]
            row[g] = {"text": text_interval(row[f"{g}_by_text"])}
        for m, g in (("kl_per_token", "kl_gap"), ("greedy_agreement", "agreement_gap"),
                     ("kl_after_fill", "kl_gap_after_fill"), ("agreement_after_fill", "agreement_gap_after_fill")):
            if f"{g}_by_text" in row:
                row[m] = base[m] + sum(row[f"{g}_by_text"]) / n
        for m, g in (("kl_by_text", "kl_gap"), ("agreement_by_text", "agreement_gap")):
            row[m] = [x + y for x, y in zip(base[m], row[f"{g}_by_text"])]
        out.append(row)
    return {**res, "rows": out, "undeferred_check": check}


def merge(parts: list[dict], sources: list[str] | None = None) -> dict:
    """One result from ``--json`` files of runs over disjoint held-out texts (``skip`` .. ``skip + sequences``)
    at the same model, length, budget and policies: means weighted by texts, and each policy's gap with
    its 95% interval from resampling whole texts (``"text"``: each text's gap, in text order; the same
    interval one run over all the texts gives with a block of the whole text). ``sources`` (the file of
    each held-out text from 0, :func:`heldout_sources`) adds ``"file"``: resampling the files, each with
    all its texts (a long file fills several texts in a row, and those are alike), and each file's gap."""
    if not parts:
        raise ValueError("parts: expected at least one --json file")
    parts = sorted(parts, key=lambda d: d.get("skip", 0))
    first = parts[0]
    key = lambda d: (d["model"], d["length"], d["budget"], d.get("defer", False),  # noqa: E731
                     d.get("defer_order", "oldest"), [r["method"] for r in d["rows"]])
    for d in parts[1:]:
        if key(d) != key(first):
            raise ValueError(f"parts: expected one model, length, budget, deferral and methods, got {key(first)} and {key(d)}")
    end = 0
    for d in parts:
        if d.get("skip", 0) < end:
            raise ValueError(f"parts: expected disjoint texts, got one starting at {d.get('skip', 0)} before {end}")
        end = d.get("skip", 0) + d["sequences"]
    n = sum(d["sequences"] for d in parts)
    index = [i for d in parts for i in range(d.get("skip", 0), d.get("skip", 0) + d["sequences"])]
    if sources is not None and len(sources) < index[-1] + 1:
        raise ValueError(f"sources: expected a file for each of the {index[-1] + 1} texts, got {len(sources)}")
    rows = []
    for j, r in enumerate(first["rows"]):
        mine = [d["rows"][j] for d in parts]
        row = {"method": r["method"]}
        for m in ("kl_per_token", "greedy_agreement", "kl_after_fill", "agreement_after_fill"):
            if all(m in x for x in mine):  # after the fill: where every part has it
                row[m] = sum(x[m] * d["sequences"] for x, d in zip(mine, parts)) / n
        for m in ("kl_by_text", "agreement_by_text", "read_fraction_by_text"):
            if all(m in x for x in mine):
                row[m] = [v for x in mine for v in x[m]]
        if r["method"] != "dms":
            for g in GAPS:
                if not all(f"{g}_by_text" in x for x in mine):
                    continue
                by = [v for x in mine for v in x[f"{g}_by_text"]]
                row[f"{g}_by_text"] = by
                row[g] = {"text": text_interval(by)}
                if sources is not None:
                    files: dict[str, list[float]] = {}
                    for t, v in zip(index, by):
                        files.setdefault(sources[t], []).append(v)
                    gaps_by_file = [torch.tensor(v, dtype=torch.float64) for v in files.values()]
                    row[g]["file"] = paired_gap([torch.zeros_like(v) for v in gaps_by_file], gaps_by_file,
                                                block=max(len(v) for v in gaps_by_file), min_blocks=1)
                    row[f"{g}_by_file"] = {f: [len(v), sum(v) / len(v)] for f, v in files.items()}
        rows.append(row)
    return add_reads({"model": first["model"], "length": first["length"], "sequences": n,
                      "defer": first.get("defer", False),
                      **({"defer_order": first["defer_order"]} if "defer_order" in first else {}),
                      "texts": [[d.get("skip", 0), d["sequences"]] for d in parts],
                      "files": None if sources is None else len({sources[i] for i in index}),
                      "budget": first["budget"], "held_fraction": max(d["held_fraction"] for d in parts), "rows": rows})


def add_reads(res: dict) -> dict:
    """Each row's K/V tokens read over a text / dense attention's: the mean of a deferred run's per-text
    counts, or a policy's at the budget (:func:`policy_reads`)."""
    n = res["length"]
    for r in res["rows"]:
        if "read_fraction_by_text" in r:
            r["read_fraction"] = sum(r["read_fraction_by_text"]) / len(r["read_fraction_by_text"])
        elif r["method"] in POLICIES:
            r["read_fraction"] = policy_reads(r["method"], res["budget"], n) / (n * (n + 1) / 2)
    return res


def show(res: dict) -> None:
    files = f" from {res['files']} files" if res.get("files") else ""
    print(f"{res['model']} at {res['length']}, {res['sequences']} texts{files}; the policies at {res['budget']} "
          f"tokens per head (DMS's peak held {res['held_fraction']:.3f})")
    if res.get("defer"):
        print(f"  dms: evictions deferred until a pool of {res['budget']} tokens per list fills; undeferred: DMS itself"
              + (f" (its per-text KL differs from the --against runs' by at most {res['undeferred_check']:.1e})"
                 if "undeferred_check" in res else ""))
    for r in res["rows"]:
        after = (f"; after the fill KL {r['kl_after_fill']:.4f}, agreement {100 * r['agreement_after_fill']:.2f}%"
                 if "kl_after_fill" in r else "")
        read = f"; reads {r['read_fraction']:.3f} of dense" if "read_fraction" in r else ""
        print(f"{r['method']:>10}: KL {r['kl_per_token']:.4f}, agreement {100 * r['greedy_agreement']:.2f}%{after}{read}")
        if r["method"] == "dms":
            continue
        print("    agreement - DMS by text, points: " + " ".join(f"{100 * g:+.2f}" for g in r["agreement_gap_by_text"]))
        if "agreement_gap_by_file" in r:
            print("    agreement - DMS by file (texts), points: " + ", ".join(
                f"{f} ({n}) {100 * g:+.2f}" for f, (n, g) in r["agreement_gap_by_file"].items()))
        for when in ("", "_after_fill"):
            for b, (g, lo, hi) in r.get(f"agreement_gap{when}", {}).items():
                k, klo, khi = r[f"kl_gap{when}"][b]
                print(f"    {'after the fill, ' if when else ''}block {b:>5}: agreement {100 * g:+.2f} "
                      f"[{100 * lo:+.2f}, {100 * hi:+.2f}]   KL {k:+.4f} [{klo:+.4f}, {khi:+.4f}]")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", help="DMS model: embedded name, folder or retrofit folder")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--skip", type=int, default=0, help="start at this held-out text (runs over disjoint texts merge)")
    p.add_argument("--budget", type=int, default=None,
                   help="the policies' KV tokens per head (default: DMS's peak held over these texts); with it the "
                        "--json file is written after every text, so a stopped run leaves the texts it finished")
    p.add_argument("--policy", nargs="*", choices=POLICIES, default=["h2o"], help="none: DMS only")
    p.add_argument("--defer", action="store_true",
                   help="score DMS with its evictions deferred until a pool of --budget tokens per layer and KV head "
                        "fills (dms_runtime.retrofit.deferred; it holds what the policies hold), with DMS "
                        "itself as the row 'undeferred'")
    p.add_argument("--defer-order", choices=DeferredAttention.ORDERS, default="oldest",
                   help="with --defer: which marked keys leave the pool first: the oldest (the runtime's rule) or "
                        "those the adapter is surest of (the largest eviction logit)")
    p.add_argument("--against", type=Path, nargs="+", metavar="JSON",
                   help="with --defer: the policies' per-text gaps from --json files of earlier runs without it over "
                        "these texts (same model, length, budget), so only DMS is scored here")
    p.add_argument("--blocks", type=int, nargs="+", default=None,
                   help="bootstrap block lengths in positions (default: 1 32 128 512 and the whole text)")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="instead of scoring: merge --json files of runs over disjoint texts (same model, length, "
                        "budget, policies); intervals resample whole texts, and files (each with its texts)")
    add_dms_overrides(p)
    p.add_argument("--json", type=Path, help="also write the rows here")
    a = p.parse_args(argv)
    if a.merge:
        try:
            parts = [json.loads(f.read_text()) for f in a.merge]
            end = max(d.get("skip", 0) + d["sequences"] for d in parts)
            sources = heldout_sources(load(a.model or parts[0]["model"]), parts[0]["length"], end)
            res = merge(parts, sources)
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"--merge: {e}")
        show(res)
        if a.json:
            a.json.write_text(json.dumps(res, indent=1) + "\n")
        return
    if not a.model:
        raise SystemExit("-m/--model: expected a DMS model (or --merge with files)")
    if a.skip < 0:
        raise SystemExit(f"--skip: expected >= 0, got {a.skip}")
    if a.budget is not None and a.budget < 2:
        raise SystemExit(f"--budget: expected >= 2 KV tokens per head, got {a.budget}")
    blocks = a.blocks or sorted({b for b in (1, 32, 128, 512) if b < a.length} | {a.length})
    if any(b < 1 for b in blocks):
        raise SystemExit(f"--blocks: expected lengths >= 1, got {blocks}")
    if a.defer and a.budget is None:
        raise SystemExit("--budget: expected the pool's size with --defer (KV tokens per layer and KV head)")
    if a.defer_order != "oldest" and not a.defer:
        raise SystemExit("--defer-order: expected --defer with it")
    earlier = []
    if a.against:
        if not a.defer:
            raise SystemExit("--against: expected --defer (it replaces scoring the policies)")
        try:
            earlier = [json.loads(f.read_text()) for f in a.against]
        except (OSError, ValueError) as e:
            raise SystemExit(f"--against: {e}")
        a.policy = []
    lm = load(a.model, dms=dms_overrides(a) or None, merge_lora=False)

    reads: dict = {}

    def result(budget, peak, per) -> dict:
        res = {"model": a.model, "length": a.length, "skip": a.skip, "sequences": len(per["dms"]), "defer": a.defer,
               **({"defer_order": a.defer_order} if a.defer and a.defer_order != "oldest" else {}),
               "budget": budget, "held_fraction": peak, "rows": gaps(per, blocks, budget)}
        for r in res["rows"]:  # deferred runs: K/V read / dense attention's, each text
            if r["method"] in reads:
                r["read_fraction_by_text"] = reads[r["method"]]
        return add_reads(against(res, earlier) if earlier else res)

    def save(budget, peak, per) -> None:
        if a.json and a.budget is not None:
            a.json.write_text(json.dumps(result(budget, peak, per), indent=1) + "\n")

    if earlier:
        try:  # before any scoring: the earlier runs cover these texts
            earlier_gaps(earlier, a.model, a.length, a.budget, a.skip, a.sequences)
        except (KeyError, ValueError) as e:
            raise SystemExit(f"--against: {e}")
    try:
        res = result(*score(lm, a.length, a.sequences, a.policy, a.skip, a.budget, each=save, defer=a.defer,
                            reads=reads, order=a.defer_order))
    except AgainstMismatch as e:
        raise SystemExit(f"--against: {e}")
    show(res)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
