"""`dms eval`: fidelity and compression against independent computations."""

import json
import math

import pytest

import torch

import dms_runtime as dr
from dms_kernels import reference as ref
from dms_runtime.cli import main
from dms_runtime.retrofit.evaluate import fidelity


def test_fidelity_of_a_model_that_never_evicts_is_perfect(tiny_with_tokenizer):
    # a zero adapter with offset 5: every logit is -5, nothing is evicted
    lm = dr.load(tiny_with_tokenizer, dms={"dms_window_size": 4, "dms_separate_alpha": True})
    row = fidelity(lm, 40, sequences=2)
    assert row.kl_per_token == 0.0 and row.greedy_agreement == 1.0
    assert row.live_fraction == 1.0 and row.compression_ratio == 1.0
    assert row.peak_live_fraction == 1.0 and row.read_fraction == 1.0


def test_fidelity_with_evictions(tiny_with_tokenizer):
    lm = dr.load(tiny_with_tokenizer, dms={"dms_window_size": 3, "dms_initial_alpha_offset": 0.0})
    row = fidelity(lm, 40, sequences=1)
    assert row.kl_per_token > 0 and row.live_fraction < 1.0 and row.compression_ratio > 1.0
    assert 0 < row.greedy_agreement <= 1 and len(row.live_fraction_per_layer) == lm.config.num_layers
    assert all(0 < f <= 1 for f in row.live_fraction_per_layer)
    assert row.live_fraction <= row.peak_live_fraction < 1.0 and 0 < row.read_fraction < 1.0


def test_eval_cli_json(tiny_with_tokenizer, capsys, tmp_path):
    rc = main(["eval", "-m", str(tiny_with_tokenizer), "--dms-window", "3", "--lengths", "24", "32",
               "--sequences", "1", "--passkey-trials", "2", "--vartrack-trials", "2", "--json", "--plot", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = json.loads(capsys.readouterr().out)
    rows = out["fidelity"]
    assert rc == 0 and [r["length"] for r in rows] == [24, 32]
    # the window set on the command line is part of the model's name in every row
    assert {r["model"] for r in rows + out["methods"]} == {f"{tiny_with_tokenizer.name} w3"}
    assert all(0 <= r["passkey_accuracy_dms"] <= 1 and 0 <= r["passkey_accuracy_vanilla"] <= 1 for r in rows)
    assert all(0 <= r["vartrack_accuracy_dms"] <= 1 and 0 <= r["vartrack_accuracy_vanilla"] <= 1 for r in rows)


def test_eval_cli_dms_offset_moves_every_logit(tiny_with_tokenizer, capsys):
    """--dms-offset X: logit = scale * raw - X, so a larger X holds more tokens; the offset is part of
    the model's name in the rows."""
    held = {}
    for x in ("-20", "0", "20"):
        rc = main(["eval", "-m", str(tiny_with_tokenizer), "--dms-window", "3", "--dms-offset", x, "--lengths", "40",
                   "--sequences", "1", "--passkey-trials", "0", "--vartrack-trials", "0", "--json"])
        rows = json.loads(capsys.readouterr().out)["fidelity"]
        assert rc == 0 and rows[0]["model"] == f"{tiny_with_tokenizer.name} w3 o{x}"
        held[x] = rows[0]["live_fraction"]
    assert held["-20"] < held["0"] < held["20"], held


def test_task_accuracy_scores_exact_answers(tiny_with_tokenizer, monkeypatch):
    """A model that answers every task right scores 1, one that never does scores 0."""
    import dms_runtime.api as api
    from dms_runtime.retrofit import evaluate

    lm = dr.load(tiny_with_tokenizer, dms={"dms_window_size": 3})
    answers = []

    def fake_generate(model, prompts, **kw):
        class R:
            texts = [answers[i] if i < len(answers) else "" for i in range(len(prompts))]
        return R()

    task = lambda n, rng: ("Q?", " 12345")  # noqa: E731
    monkeypatch.setattr(api, "generate", fake_generate)
    answers[:] = [" 12345", " 12345"]
    assert evaluate.task_accuracy(lm, 16, task, 2, 0) == (1.0, 1.0)
    answers[:] = [" 999", " 1"]
    assert evaluate.task_accuracy(lm, 16, task, 2, 0) == (0.0, 0.0)


def test_compare_methods_puts_policies_at_the_dms_budget(tiny_with_tokenizer):
    from dms_runtime.retrofit.evaluate import compare_methods

    lm = dr.load(tiny_with_tokenizer, dms={"dms_window_size": 3, "dms_initial_alpha_offset": 0.0})
    dms_row, rows = compare_methods(lm, 40, sequences=1, policies=["streaming", "tova", "h2o", "quest"],
                                    passkey_trials=2)
    by = {r.method: r for r in rows}
    assert list(by) == ["vanilla", "dms", "streaming", "tova", "h2o", "quest"]
    assert by["vanilla"].kl_per_token == 0 and by["vanilla"].held_fraction == 1.0
    assert by["dms"].kl_per_token == dms_row.kl_per_token and by["dms"].held_fraction == dms_row.peak_live_fraction
    budget = by["tova"].budget
    assert budget == max(2, math.ceil(dms_row.peak_live_fraction * 40)) and budget < 40
    for name in ("streaming", "tova", "h2o"):  # evicting policies hold the budget, no more
        assert by[name].held_fraction == pytest.approx(min(budget, 40) / 40)
        assert by[name].kl_per_token > 0 and 0 <= by[name].passkey_accuracy <= 1
    assert by["quest"].held_fraction == 1.0 and by["quest"].read_fraction < 1.0
    assert all(r.budget == budget for r in rows[2:])
    assert by["vanilla"].kl_gap is None and by["dms"].agreement_gap is None
    for r in rows[2:]:  # one text: the paired gap's mean is the difference of the means
        assert r.kl_gap[0] == pytest.approx(r.kl_per_token - dms_row.kl_per_token, abs=1e-6)
        assert r.agreement_gap[0] == pytest.approx(r.greedy_agreement - dms_row.greedy_agreement, abs=1e-6)
        assert r.kl_gap[1] <= r.kl_gap[0] <= r.kl_gap[2] and r.agreement_gap[1] <= r.agreement_gap[0] <= r.agreement_gap[2]


def test_compare_methods_defers_dms_to_the_policies_budget(tiny_with_tokenizer):
    """The dms-deferred row is the deferred rule (retrofit.deferred) at the held-matched pool, recomputed
    here: its scores, memory, reads, passkey and gap to DMS; it holds what the policies hold."""
    from dms_runtime.retrofit.deferred import deferred_forward
    from dms_runtime.retrofit.evaluate import (compare_methods, heldout_sequences, paired_gap, token_scores,
                                               vanilla_logits)

    lm = dr.load(tiny_with_tokenizer, dms={"dms_window_size": 3, "dms_initial_alpha_offset": 0.0})
    n, cfg = 40, lm.config
    dms_row, rows = compare_methods(lm, n, sequences=2, policies=["h2o"], passkey_trials=2, defer=True)
    by = {r.method: r for r in rows}
    assert list(by) == ["vanilla", "dms", "dms-deferred", "h2o"]
    row, budget = by["dms-deferred"], by["h2o"].budget
    assert row.budget == budget and budget < n
    lists = cfg.num_layers * cfg.num_kv_heads
    seqs = heldout_sequences(lm, n, 2)
    scores, peak, reads = [], 0, 0
    for s, van in zip(seqs, vanilla_logits(lm, seqs)):
        logits, backend = deferred_forward(lm.model, s, 3, budget * lists)
        scores.append(token_scores(logits, van))
        peak, reads = max(peak, backend.held_peak), reads + backend.reads
    assert row.kl_per_token == pytest.approx(sum(kl.mean().item() for kl, _ in scores) / 2)
    assert row.greedy_agreement == pytest.approx(sum(h.mean().item() for _, h in scores) / 2)
    assert row.held_fraction == peak / (n * lists)
    assert row.read_fraction == pytest.approx(reads / 2 / (lists * n * (n + 1) / 2))
    # it fills the pool (holding more only where its own marks' minimum is larger) and reads more than DMS
    assert row.held_fraction >= budget / n
    assert row.read_fraction >= by["dms"].read_fraction
    assert 0 <= row.passkey_accuracy <= 1
    dms_scores = []
    fidelity(lm, n, 2, scores=dms_scores)
    assert row.kl_gap == pytest.approx(paired_gap([kl for kl, _ in dms_scores], [kl for kl, _ in scores]))
    assert row.kl_gap[0] != 0  # deferring changes what is seen
    without = compare_methods(lm, n, sequences=2, policies=["h2o"])[1]
    assert [r.method for r in without] == ["vanilla", "dms", "h2o"]
    with pytest.raises(ValueError, match="defer"):
        compare_methods(lm, n, sequences=1, defer="yes")


def test_paired_gap_on_hand_made_scores():
    from dms_runtime.retrofit.evaluate import paired_gap

    a = [torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([1.0, 1.0])]
    assert paired_gap(a, a) == [0.0, 0.0, 0.0]
    # a constant shift on every position: the gap is the shift, whatever blocks are drawn
    gap = paired_gap(a, [t + 0.25 for t in a], block=2)
    assert gap == pytest.approx([0.25, 0.25, 0.25])
    # the mean runs over positions, not texts: 6 positions, 3 of them one higher
    assert paired_gap(a, [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0])])[0] == pytest.approx(2 / 6)
    # one short text and a long block: blocks shrink to leave 8 of them, so the interval is not a point
    x = torch.arange(40.0) % 3
    gap, low, high = paired_gap([x], [x.flip(0) * 2], block=512)
    assert low < gap < high
    with pytest.raises(ValueError, match="other"):
        paired_gap(a, a[:1])
    with pytest.raises(ValueError, match="other"):
        paired_gap(a, [a[0], torch.ones(3)])
    with pytest.raises(ValueError, match="block"):
        paired_gap(a, a, block=0)


def test_paired_gap_interval_covers_the_truth_and_narrows_with_more_positions():
    from dms_runtime.retrofit.evaluate import paired_gap

    # agreement-like scores: base right on 90% of positions, other flips 10% of them at random, so
    # the expected gap is 0.1 * (0.1 - 0.9) = -0.08; 95% intervals must hold it nearly always
    g = torch.Generator().manual_seed(0)
    widths, covered = [], 0
    for trial in range(20):
        base = [(torch.rand(2048, generator=g) < 0.90).float() for _ in range(2)]
        other = [torch.where(torch.rand(2048, generator=g) < 0.1, 1 - b, b) for b in base]
        gap, low, high = paired_gap(base, other, block=128, resamples=500, seed=trial)
        assert gap == pytest.approx(sum((o - b).sum().item() for b, o in zip(base, other)) / 4096)
        covered += low <= -0.08 <= high
        widths.append(high - low)
    assert covered >= 17
    assert 0.01 < sum(widths) / len(widths) < 0.03  # about 4 standard errors of sqrt(0.1 / 4096)
    short = paired_gap([base[0][:256]], [other[0][:256]], block=16, resamples=500)  # 16x fewer positions: 4x wider
    assert short[2] - short[1] > 2.5 * sum(widths) / len(widths)



def test_compare_methods_can_match_the_dms_reads(tiny_with_tokenizer):
    from dms_runtime.retrofit.evaluate import compare_methods
    from dms_runtime.retrofit.policies import read_budget

    lm = dr.load(tiny_with_tokenizer, dms={"dms_window_size": 3, "dms_initial_alpha_offset": 0.0})
    dms_row, rows = compare_methods(lm, 60, sequences=1, policies=["streaming", "tova", "h2o"], match="read")
    by = {r.method: r for r in rows}
    for name in ("streaming", "tova", "h2o"):
        assert by[name].budget == read_budget(name, dms_row.read_fraction, 60)
        # the smallest budget reading at least as much as DMS: within one key per query of it
        assert dms_row.read_fraction <= by[name].read_fraction < dms_row.read_fraction + 60 / (60 * 61 / 2)
    held = {r.method: r for r in compare_methods(lm, 60, sequences=1, policies=["tova"])[1]}
    assert by["tova"].budget <= held["tova"].budget  # DMS reads at most what it holds at each step
    with pytest.raises(ValueError, match="match"):
        compare_methods(lm, 60, sequences=1, policies=["tova"], match="peak")


def test_eval_cli_policies_table_and_plot(tiny_with_tokenizer, capsys, tmp_path):
    rc = main(["eval", "-m", str(tiny_with_tokenizer), "--dms-window", "3", "--dms-sinks", "2", "--lengths", "32",
               "--sequences", "1", "--policy", "streaming", "quest", "--plot", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert "streaming" in out and "quest" in out and "budget" in out
    assert "agreement - DMS, points [95%]" in out
    streaming_line = next(line for line in out.splitlines() if line.strip().startswith("streaming |"))
    assert streaming_line.count("[") == 2  # its paired gaps to DMS, on KL and on agreement
    assert f"{tiny_with_tokenizer.name} w3 s2" in out  # the settings given are part of the model's name


def test_eval_cli_defer_row_and_plot(tiny_with_tokenizer, capsys, tmp_path):
    rc = main(["eval", "-m", str(tiny_with_tokenizer), "--dms-window", "3", "--dms-offset", "0", "--lengths", "32",
               "--sequences", "1", "--defer", "--plot", str(tmp_path / "p.png"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    by = {r["method"]: r for r in out["methods"]}
    assert list(by) == ["vanilla", "dms", "dms-deferred"]
    assert by["dms-deferred"]["held_fraction"] >= by["dms-deferred"]["budget"] / 32
    assert len(by["dms-deferred"]["agreement_gap"]) == 3


def test_heldout_sources_name_the_file_holding_most_of_each_text(monkeypatch):
    from types import SimpleNamespace

    from dms_runtime.retrofit import evaluate

    docs = [("a.py", "aaaaa"), ("b.py", "bbbbbbbbbbbb"), ("c.py", "ccc"), ("d.py", "dddddddddd"), ("e.py", "eeee")]
    monkeypatch.setattr(evaluate, "stdlib_documents",
                        lambda seed, split, names=False: iter(docs if names else [t for _, t in docs]))
    lm = SimpleNamespace(tokenizer=lambda text, add_special_tokens: {"input_ids": [ord(ch) for ch in text]})
    seqs = evaluate.heldout_sequences(lm, 8, 4)  # a5 b3 | b8 | b1 c3 d4 | d6 e2 (e2 left over)
    assert ["".join(map(chr, s)) for s in seqs] == ["aaaaabbb", "bbbbbbbb", "bcccdddd", "ddddddee"]
    assert evaluate.heldout_sources(lm, 8, 4) == ["a.py", "b.py", "d.py", "d.py"]
    assert evaluate.heldout_sources(lm, 4, 2) == ["a.py", "b.py"]  # a4 | a1 b3
    assert evaluate.heldout_sources(lm, 2, 3) == ["a.py", "a.py", "a.py"]  # a2 | a2 | a1 b1: the first of equals
    with pytest.raises(ValueError, match="fewer than 5"):
        evaluate.heldout_sources(lm, 8, 5)
