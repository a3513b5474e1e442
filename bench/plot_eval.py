"""Merge several `dms eval --json` outputs (runs split by length or task, so a CPU can take them in
turns) into one set of rows: the Markdown tables of bench/RESULTS.md and the quality-vs-KV figure.

    .venv/bin/python bench/plot_eval.py bench/results/2026-12-02-eval-*.json \
        --plot bench/results/2026-12-02-eval-curves.png

A file given as ``FILE=NAME`` has its model renamed NAME in every row (a run of one model with another
setting, e.g. `--dms-window 256`, made before `dms eval` put the window in the name).
Fidelity rows (KL, greedy agreement, KV held and read) are taken from the first file that has them
for a (method, model, length); each method's retrieval accuracy is recomputed over every file's
retrieval rows: the mean over the tasks where vanilla is informative at that length.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from dms_runtime.retrofit.cli import plot_pareto
from dms_runtime.retrofit.evaluate import MethodRow, RetrievalRow, mean_informative

NAMES = {"vanilla": "vanilla", "dms": "DMS", "streaming": "StreamingLLM", "tova": "TOVA", "h2o": "H2O", "quest": "Quest"}


def merge(paths: list[Path | str]) -> tuple[list[MethodRow], list[RetrievalRow]]:
    methods: dict[tuple, MethodRow] = {}
    retrieval: dict[tuple, RetrievalRow] = {}
    for arg in paths:
        path, _, rename = str(arg).partition("=")
        path = Path(path)
        out = json.loads(path.read_text())
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
    rrows = list(retrieval.values())
    mrows = [replace(m, retrieval_accuracy=mean_informative(rrows, m.method, m.model, m.length)) for m in methods.values()]
    return mrows, rrows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def markdown(mrows: list[MethodRow], rrows: list[RetrievalRow]) -> str:
    lines = ["| length | method | model | KV held | KV read | KL / token | greedy agreement | retrieval |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in sorted(mrows, key=lambda m: (m.length, m.model, m.method != "vanilla", m.method != "dms")):
        lines.append(f"| {m.length} | {NAMES.get(m.method, m.method)} | {m.model if m.method != 'vanilla' else ''} | "
                     f"{m.held_fraction:.3f} | {m.read_fraction:.3f} | {m.kl_per_token:.3f} | "
                     f"{100 * m.greedy_agreement:.1f}% | {_pct(m.retrieval_accuracy)} |")
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
    p.add_argument("json", nargs="+", help="outputs of `dms eval --json` (FILE=NAME: its model renamed NAME)")
    p.add_argument("--plot", default=None, help="write the quality-vs-KV figure to this PNG")
    args = p.parse_args(argv)
    mrows, rrows = merge(args.json)
    print(markdown(mrows, rrows))
    if args.plot:
        plot_pareto(mrows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
