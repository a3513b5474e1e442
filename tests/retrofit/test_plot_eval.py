"""bench/plot_eval.py: runs split by length and task merge into one table and figure."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _method(method, model, length, kl, retrieval=None):
    return {"method": method, "model": model, "length": length, "budget": None if method in ("vanilla", "dms") else 9,
            "kl_per_token": kl, "greedy_agreement": 1 - kl, "held_fraction": 1.0 if method == "vanilla" else 0.2,
            "read_fraction": 1.0 if method == "vanilla" else 0.3, "passkey_accuracy": None,
            "retrieval_accuracy": retrieval}


def _retrieval(method, model, task, length, acc, van):
    return {"method": method, "model": model, "task": task, "length": length, "cases": 4, "accuracy": acc,
            "vanilla_accuracy": van, "informative": van >= 0.8, "budget_fraction": None, "held_fraction": None}


def test_runs_split_by_task_merge_into_one_retrieval_score(tmp_path):
    a = {"fidelity": [], "methods": [_method("vanilla", "m", 64, 0.0, 1.0), _method("dms", "m", 64, 0.1, 0.5),
                                     {**_method("h2o", "m", 64, 0.2, 0.0), "kl_gap": [0.1, 0.05, 0.15],
                                      "agreement_gap": [-0.1, -0.125, -0.075]}],
         "retrieval": [_retrieval("vanilla", "m", "passkey", 64, 1.0, 1.0), _retrieval("dms", "m", "passkey", 64, 0.5, 1.0),
                       _retrieval("h2o", "m", "passkey", 64, 0.0, 1.0)]}
    b = {"fidelity": [], "methods": [_method("vanilla", "m", 64, 0.0, 0.9), _method("dms", "m", 64, 0.7, 1.0)],
         "retrieval": [_retrieval("vanilla", "m", "multikey", 64, 0.9, 0.9), _retrieval("dms", "m", "multikey", 64, 1.0, 0.9),
                       _retrieval("vanilla", "m", "vartrack", 64, 0.25, 0.25), _retrieval("dms", "m", "vartrack", 64, None, 0.25)]}
    for name, out in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(out))
    plot = tmp_path / "curves.png"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "plot_eval.py"), str(tmp_path / "a.json"),
                          str(tmp_path / "b.json"), "--plot", str(plot)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    # fidelity from the first file; retrieval: the mean over the informative tasks of both (vartrack left out)
    assert "| 64 | DMS | m | 0.200 | 0.300 | 0.100 | 90.0% | 75% | - |" in lines
    assert "| 64 | vanilla |  | 1.000 | 1.000 | 0.000 | 100.0% | 95% | - |" in lines
    assert "| 64 | H2O | m | 0.200 | 0.300 | 0.200 | 80.0% | 0% | -10.00 [-12.50, -7.50] |" in lines
    assert "| vartrack | 64 | 4 | DMS | m | - | 25% | no | - |" in lines
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # the same model run again with another setting, renamed on the command line: a row of its own
    (tmp_path / "w.json").write_text(json.dumps({"fidelity": [], "methods": [_method("dms", "m", 64, 0.05)]}))
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "plot_eval.py"), str(tmp_path / "a.json"),
                          f"{tmp_path / 'w.json'}=m w256"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| 64 | DMS | m | 0.200 | 0.300 | 0.100 | 90.0% | 50% | - |" in run.stdout.splitlines()
    assert "| 64 | DMS | m w256 | 0.200 | 0.300 | 0.050 | 95.0% | - | - |" in run.stdout.splitlines()
    (tmp_path / "bad.json").write_text("[]")
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "plot_eval.py"), str(tmp_path / "bad.json")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "bad.json: expected the output of `dms eval --json`" in run.stderr


def _cases(path, method, correct, model="m", length=64, budget=None, held=0.2, **over):
    run = {"model": model, "task": "passkey", "length": length, "method": method, "budget": budget,
           "cases": len(correct), "seed": 0, "dms_window": None, "dms_sinks": None, **over}
    path.write_text("".join(json.dumps({**run, "case": i, "depth": i / max(1, len(correct) - 1), "correct": c,
                                        "held": held, "text": "x", "s": 1.0}) + "\n" for i, c in enumerate(correct)))


def test_case_by_case_runs_become_retrieval_rows(tmp_path):
    a = {"fidelity": [], "methods": [_method("vanilla", "m", 64, 0.0), _method("dms", "m", 64, 0.1),
                                     _method("h2o", "m", 64, 0.2)]}
    (tmp_path / "a.json").write_text(json.dumps(a))
    _cases(tmp_path / "van.jsonl", "vanilla", [1, 1, 1, 1, 0], held=1.0)
    _cases(tmp_path / "dms.jsonl", "dms", [1, 0, 1, 0, 0], held=0.15)
    _cases(tmp_path / "h2o.jsonl", "h2o", [0, 0, 1, 0, 0], budget=0.2)
    _cases(tmp_path / "w.jsonl", "dms", [1, 1, 1, 0, 0], dms_window=256, dms_sinks=4)
    script = [sys.executable, str(ROOT / "bench" / "plot_eval.py")]
    files = [str(tmp_path / n) for n in ("a.json", "van.jsonl", "dms.jsonl", "h2o.jsonl", "w.jsonl")]
    run = subprocess.run(script + files, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert "| 64 | DMS | m | 0.200 | 0.300 | 0.100 | 90.0% | 40% | - |" in lines
    assert "| 64 | H2O | m | 0.200 | 0.300 | 0.200 | 80.0% | 20% | - |" in lines
    assert "| passkey | 64 | 5 | DMS | m | 40% | 80% | yes | 0.150 |" in lines
    assert "| passkey | 64 | 5 | DMS | m w256 s4 | 60% | 80% | yes | 0.200 |" in lines
    # vanilla under the threshold: the task is uninformative and stays out of the methods' score
    _cases(tmp_path / "van.jsonl", "vanilla", [1, 1, 1, 0, 0], held=1.0)
    run = subprocess.run(script + files, capture_output=True, text=True, timeout=300)
    assert "| 64 | DMS | m | 0.200 | 0.300 | 0.100 | 90.0% | - | - |" in run.stdout.splitlines()
    assert "| passkey | 64 | 5 | DMS | m | 40% | 60% | no | 0.150 |" in run.stdout.splitlines()
    # an unfinished run, another run's lines, no vanilla: refused by name
    _cases(tmp_path / "part.jsonl", "dms", [1, 0])
    (tmp_path / "part.jsonl").write_text((tmp_path / "part.jsonl").read_text().replace('"cases": 2', '"cases": 20'))
    run = subprocess.run(script + [files[1], str(tmp_path / "part.jsonl")], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "part.jsonl: 2 of 20 cases written" in run.stderr
    mixed = (tmp_path / "dms.jsonl").read_text().splitlines()
    mixed[2] = mixed[2].replace('"seed": 0', '"seed": 1')
    (tmp_path / "mixed.jsonl").write_text("\n".join(mixed) + "\n")
    run = subprocess.run(script + [files[1], str(tmp_path / "mixed.jsonl")], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "mixed.jsonl: line 3 is case 2 of another run" in run.stderr
    run = subprocess.run(script + [files[0], files[2]], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "dms.jsonl: no vanilla accuracy on passkey at 64" in run.stderr


def test_paired_gaps_runs_and_deferred_cases_become_rows(tmp_path):
    """A bench/paired_gaps.py file: a --defer run gives the dms-deferred row (held: its peak), leaves its
    undeferred DMS out, and the policies hold their budget; a retrieval run of DMS with a budget is deferred."""
    def row(method, kl, read=None):
        return {"method": method, "kl_per_token": kl, "greedy_agreement": 1 - kl, "kl_by_text": [kl],
                **({} if read is None else {"read_fraction": read})}

    deferred = {"model": "m", "length": 64, "sequences": 3, "defer": True, "budget": 16, "held_fraction": 0.27,
                "rows": [row("dms", 0.03, 0.4), row("undeferred", 0.05, 0.2), row("h2o", 0.09, 0.4)]}
    plain = {"model": "m", "length": 128, "sequences": 3, "budget": 24, "held_fraction": 0.19,
             "rows": [row("dms", 0.04, 0.15), row("tova", 0.1)]}
    (tmp_path / "d.json").write_text(json.dumps(deferred))
    (tmp_path / "p.json").write_text(json.dumps(plain))
    _cases(tmp_path / "van.jsonl", "vanilla", [1, 1, 1, 1, 1], held=1.0)
    _cases(tmp_path / "def.jsonl", "dms", [1, 1, 1, 1, 0], budget=0.25, held=0.25)
    plot = tmp_path / "p.png"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "plot_eval.py"), f"{tmp_path / 'd.json'}=cr8",
                          str(tmp_path / "p.json"), str(tmp_path / "van.jsonl"), f"{tmp_path / 'def.jsonl'}=cr8",
                          "--plot", str(plot)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert "| 64 | DMS deferred | cr8 | 0.270 | 0.400 | 0.030 | 97.0% | 80% | - |" in lines
    assert "| 64 | H2O | cr8 | 0.250 | 0.400 | 0.090 | 91.0% | - | - |" in lines
    assert not any("| 64 | DMS | cr8 |" in x for x in lines)  # undeferred: its peak is not in the file
    assert "| 128 | DMS | m | 0.190 | 0.150 | 0.040 | 96.0% | - | - |" in lines
    assert "| 128 | TOVA | m | 0.188 | - | 0.100 | 90.0% | - | - |" in lines  # reads not recorded
    assert "| passkey | 64 | 5 | DMS deferred | cr8 | 80% | 100% | yes | 0.250 |" in lines
    assert plot.read_bytes()[:4] == b"\x89PNG"
