"""Merge several `dms eval --json` outputs (runs split by length or task, so a CPU can take them in
turns) into one set of rows: the Markdown tables of bench/RESULTS.md and the quality-vs-KV figure.

    .venv/bin/python bench/plot_eval.py bench/results/2026-12-02-eval-*.json \
        --plot bench/results/2026-12-02-eval-curves.png

A file given as ``FILE=NAME`` has its model renamed NAME in every row (a run of one model with another
setting, e.g. `--dms-window 256`, made before `dms eval` put the window in the name). A ``.jsonl`` file
is one completed run of bench/retrieval_cases.py (one method, case by case, at 4K-8K where `dms eval`
takes too long): it becomes that method's retrieval row, informative where vanilla's cases (its own
file, or a `dms eval` output) reach the calibration threshold; a run with a budget and method "dms" is
deferred DMS (`--method dms --budget F`), the row "dms-deferred". A ``.json`` file of bench/paired_gaps.py
(one run or a merge) gives its rows over all its texts: in a `--defer` run "dms" is "dms-deferred" (held:
the run's peak) and "undeferred" is DMS; the policies hold their budget.
Fidelity rows (KL, greedy agreement, KV held and read) are taken from the first file that has them
for a (method, model, length); each method's retrieval accuracy is recomputed over every file's
retrieval rows: the mean over the tasks where vanilla is informative at that length.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from dms_runtime.retrofit.cli import model_label, plot_pareto
from dms_runtime.retrofit.evaluate import CALIBRATION, DEFERRED, MethodRow, RetrievalRow, mean_informative

NAMES = {"vanilla": "vanilla", "dms": "DMS", "dms-deferred": "DMS deferred", "streaming": "StreamingLLM", "tova": "TOVA",
         "h2o": "H2O", "quest": "Quest"}


# what names one run of bench/retrieval_cases.py: every line of its file carries these
RUN_KEYS = ("model", "task", "length", "method", "budget", "cases", "seed", "dms_window", "dms_sinks", "dms_offset")


def cases_row(path: Path, rename: str = "") -> RetrievalRow:
    """One completed run of bench/retrieval_cases.py as a retrieval row; vanilla's accuracy and
    whether the task is informative are filled in by ``merge`` from vanilla's row at that length."""
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if not lines or not all(isinstance(r, dict) and "correct" in r for r in lines):
        raise SystemExit(f"{path}: expected the JSON lines of bench/retrieval_cases.py (one case per line)")
    run = {k: lines[0].get(k) for k in RUN_KEYS}
    for j, r in enumerate(lines):
        if {k: r.get(k) for k in RUN_KEYS} != run or r.get("case") != j:
            raise SystemExit(f"{path}: line {j + 1} is case {r.get('case')} of another run; expected case {j} of {run}")
    if len(lines) != run["cases"]:
        raise SystemExit(f"{path}: {len(lines)} of {run['cases']} cases written; finish the run "
                         f"(bench/retrieval_cases.py resumes it) or leave the file out")
    acc = sum(r["correct"] for r in lines) / len(lines)
    method = DEFERRED if run["method"] == "dms" and run["budget"] is not None else run["method"]
    return RetrievalRow(method=method, model=rename or model_label(run["model"], run["dms_window"], run["dms_sinks"],
                                                                  run["dms_offset"]),
                        task=run["task"], length=run["length"], cases=len(lines), accuracy=acc,
                        vanilla_accuracy=acc if run["method"] == "vanilla" else float("nan"), informative=False,
                        budget_fraction=run["budget"], held_fraction=sum(r["held"] for r in lines) / len(lines))


def gaps_rows(out: dict, rename: str = "") -> list[MethodRow]:
    """A bench/paired_gaps.py output's rows (means over its texts). Held: a policy its budget, DMS (a run
    without --defer) or deferred DMS the run's peak; a deferred run's "undeferred" DMS is left out (its peak
    is not recorded there). Read: None where the run did not record it (runs before it did)."""
    length, budget, model, defer = out["length"], out["budget"], rename or out["model"], out.get("defer", False)
    rows = []
    for r in out["rows"]:
        if r["method"] == "undeferred":
            continue
        method = DEFERRED if r["method"] == "dms" and defer else r["method"]
        dms = method in ("dms", DEFERRED)
        rows.append(MethodRow(method, model, length, None if dms else budget, r["kl_per_token"], r["greedy_agreement"],
                              out["held_fraction"] if dms else budget / length, r.get("read_fraction")))
    return rows


def merge(paths: list[Path | str]) -> tuple[list[MethodRow], list[RetrievalRow]]:
    methods: dict[tuple, MethodRow] = {}
    retrieval: dict[tuple, RetrievalRow] = {}
    case_rows: list[tuple[Path, RetrievalRow]] = []
    for arg in paths:
        path, _, rename = str(arg).partition("=")
        path = Path(path)
        if path.suffix == ".jsonl":
            row = cases_row(path, rename)
            case_rows.append((path, row))
            if row.method == "vanilla":
                retrieval.setdefault(("vanilla", "", row.task, row.length), replace(row, informative=row.accuracy >= CALIBRATION))
            continue
        out = json.loads(path.read_text())
        if isinstance(out, dict) and "rows" in out and "budget" in out:
            for row in gaps_rows(out, rename):
                methods.setdefault((row.method, row.model, row.length), row)
            continue
        if not isinstance(out, dict) or "methods" not in out:
            raise SystemExit(f"{path}: expected the output of `dms eval --json` with methods rows")
        if rename:
            for r in [*out["methods"], *out.get("retrieval", [])]:
                r["model"] = rename
        for r in out.get("retrieval", []):
            row = RetrievalRow(**r)
            retrieval.setdefault((row.method, row.model if row.method != "vanilla" else "", row.task, row.length), row)
        for r in out["methods"]:
            row = MethodRow(**r)
            methods.setdefault((row.method, row.model if row.method != "vanilla" else "", row.length), row)
    for path, row in case_rows:
        if row.method == "vanilla":
            continue
        van = retrieval.get(("vanilla", "", row.task, row.length))
        if van is None:
            raise SystemExit(f"{path}: no vanilla accuracy on {row.task} at {row.length}: give vanilla's cases "
                             f"(bench/retrieval_cases.py --method vanilla) or a `dms eval` output that has them")
        row = replace(row, vanilla_accuracy=van.vanilla_accuracy, informative=van.informative)
        retrieval.setdefault((row.method, row.model, row.task, row.length), row)
    rrows = list(retrieval.values())
    mrows = [replace(m, retrieval_accuracy=mean_informative(rrows, m.method, m.model, m.length)) for m in methods.values()]
    return mrows, rrows


def _frac(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def markdown(mrows: list[MethodRow], rrows: list[RetrievalRow]) -> str:
    lines = ["| length | method | model | KV held | KV read | KL / token | greedy agreement | retrieval | "
             "agreement - DMS, points [95%] |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in sorted(mrows, key=lambda m: (m.length, m.model, m.method != "vanilla", m.method != "dms")):
        gap = "-" if m.agreement_gap is None else "{:+.2f} [{:+.2f}, {:+.2f}]".format(*(100 * g for g in m.agreement_gap))
        lines.append(f"| {m.length} | {NAMES.get(m.method, m.method)} | {m.model if m.method != 'vanilla' else ''} | "
                     f"{m.held_fraction:.3f} | {_frac(m.read_fraction)} | {m.kl_per_token:.3f} | "
                     f"{100 * m.greedy_agreement:.1f}% | {_pct(m.retrieval_accuracy)} | {gap} |")
    lines += ["", "| task | length | cases | method | model | accuracy | vanilla | informative | KV held |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rrows, key=lambda r: (r.task, r.length, r.model, r.method != "vanilla", r.method != "dms")):
        held = "-" if r.held_fraction is None else f"{r.held_fraction:.3f}"
        lines.append(f"| {r.task} | {r.length} | {r.cases} | {NAMES.get(r.method, r.method)} | "
                     f"{r.model if r.method != 'vanilla' else ''} | {_pct(r.accuracy)} | {_pct(r.vanilla_accuracy)} | "
                     f"{'yes' if r.informative else 'no'} | {held} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="outputs of `dms eval --json` and runs of bench/retrieval_cases.py "
                                            "(.jsonl); FILE=NAME: its model renamed NAME")
    p.add_argument("--plot", default=None, help="write the quality-vs-KV figure to this PNG")
    args = p.parse_args(argv)
    mrows, rrows = merge(args.json)
    print(markdown(mrows, rrows))
    if args.plot:
        plot_pareto(mrows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
