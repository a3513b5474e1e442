"""bench/retrieval_cases.py (resumable case-by-case retrieval), bench/error_profile.py (where errors fall) and
bench/ship_retrofit.py (a run into the package, or into a committed starting point)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def bench(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_retrieval_cases_resume_after_the_last_case_written(tiny_with_tokenizer, tmp_path, capsys):
    from dms_runtime import load
    from dms_runtime.retrofit.retrieval import make_cases, policy_answers, score

    mod = bench("retrieval_cases")
    out = tmp_path / "r.jsonl"
    args = ["-m", str(tiny_with_tokenizer), "--length", "200", "--method", "streaming", "--budget", "0.5",
            "--cases", "3", "--out", str(out)]
    mod.main(args)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["case"] for r in rows] == [0, 1, 2] and [r["depth"] for r in rows] == [0.0, 0.5, 1.0]
    # the lines are the suite's cases under the suite's runner
    lm = load(str(tiny_with_tokenizer))
    cases = make_cases(lm.tokenizer, "passkey", 200, 3, 0, context=lm.config.max_position_embeddings)
    texts, held = policy_answers(lm, cases, "streaming", 0.5)
    assert [r["text"] for r in rows] == texts and [r["held"] for r in rows] == held
    assert [r["correct"] for r in rows] == [score("passkey", c.answers, t) for c, t in zip(cases, texts)]
    # cut after the first case: the rerun writes cases 1 and 2 again, the same
    out.write_text(out.read_text().splitlines()[0] + "\n")
    mod.main(args)
    again = [json.loads(x) for x in out.read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "s"} for r in rs]  # noqa: E731
    assert strip(again) == strip(rows)
    # another run's file is refused, not appended to
    with pytest.raises(SystemExit):
        mod.main(args[:-4] + ["--cases", "4", "--out", str(out)])
    assert "of another run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mod.main(args[:6] + ["--cases", "3", "--out", str(tmp_path / "x.jsonl")])  # a policy without --budget
    assert "--budget: a policy needs" in capsys.readouterr().err


def test_retrieval_with_deferred_eviction_at_a_policy_budget(tiny_with_tokenizer, tmp_path):
    import dms_runtime as dr
    from dms_runtime.paged import PagedConfig
    from dms_runtime.retrofit.policies import policy_budget
    from dms_runtime.retrofit.retrieval import generate_answers, make_cases

    lm = dr.load(str(tiny_with_tokenizer), dms={"dms_window_size": 4, "dms_initial_alpha_offset": 0.0})
    cases = make_cases(lm.tokenizer, "passkey", 120, 2, 0, context=lm.config.max_position_embeddings)
    plain, held_plain = generate_answers(lm, cases)
    deferred, held = generate_answers(lm, cases, defer_fraction=0.8)
    assert held > held_plain  # the pool holds what DMS alone would have evicted
    for c, text in zip(cases, deferred):  # each case at the budget a policy gets for it
        budget = policy_budget(0.8, len(c.prompt_ids))
        want = dr.generate(lm, [c.prompt_ids], max_new_tokens=c.max_new_tokens, chat=False,
                           paged=PagedConfig(defer_budget=budget))
        assert text == (want.texts[0] or "")
    mod = bench("retrieval_cases")
    with pytest.raises(SystemExit):
        mod.main(["-m", str(tiny_with_tokenizer), "--length", "120", "--method", "vanilla", "--budget", "0.5",
                  "--out", str(tmp_path / "v.jsonl")])


def test_error_profile_on_hand_made_tokens():
    prof = bench("error_profile").profile
    kl = torch.tensor([0.0, 0.0, 1.0, 3.0] + [0.0] * 96)
    wrong = torch.zeros(100, dtype=torch.bool)
    wrong[[2, 3]] = True
    top1 = torch.full((100,), 0.5)
    top1[[0, 3]] = 0.95
    filled = torch.arange(100) >= 3  # the budget fills at position 3
    r = prof(kl, wrong, top1, filled)
    assert r["kl_mean"] == pytest.approx(0.04)
    assert r["kl_share_worst_1pct"] == pytest.approx(0.75) and r["kl_share_worst_5pct"] == pytest.approx(1.0)
    assert r["agreement"] == pytest.approx(0.98)
    assert r["agreement_vanilla_confident"] == pytest.approx(0.5)  # tokens 0 (right) and 3 (wrong)
    assert r["agreement_vanilla_unsure"] == pytest.approx(97 / 98)
    assert r["wrong_where_vanilla_confident"] == pytest.approx(0.5)
    assert r["vanilla_top1_at_wrong_p50"] == pytest.approx(0.5)  # median of (0.5, 0.95): the lower
    assert r["after_budget_fraction"] == pytest.approx(0.97)
    assert r["kl_mean_before_budget"] == pytest.approx(1 / 3) and r["kl_mean_after_budget"] == pytest.approx(3 / 97)
    assert r["agreement_before_budget"] == pytest.approx(2 / 3) and r["agreement_after_budget"] == pytest.approx(96 / 97)
    assert prof(kl, wrong, top1, torch.ones(100, dtype=torch.bool))["agreement_before_budget"] is None


def test_error_profile_gap_after_the_fill_is_the_difference_there(tiny_with_tokenizer, tmp_path):
    out = tmp_path / "e.json"
    bench("error_profile").main(["-m", str(tiny_with_tokenizer), "--dms-window", "3", "--dms-offset", "0",
                                 "--length", "48", "--sequences", "2", "--policy", "h2o", "--json", str(out)])
    dms, h2o = json.loads(out.read_text())
    assert "agreement_gap_after_budget" not in dms and h2o["budget"] < 48
    gap, low, high = h2o["agreement_gap_after_budget"]
    assert gap == pytest.approx(h2o["agreement_after_budget"] - dms["agreement_after_budget"], abs=1e-9)
    assert low <= gap <= high
    assert h2o["kl_gap_after_budget"][0] == pytest.approx(h2o["kl_mean_after_budget"] - dms["kl_mean_after_budget"],
                                                          abs=1e-6)


def test_layer_shift_probe_moves_memory_both_ways(tiny_with_tokenizer, tmp_path):
    out = tmp_path / "p.jsonl"
    bench("layer_shift_probe").main(["-m", str(tiny_with_tokenizer), "--dms-window", "3", "--length", "64",
                                     "--uniform", "-1000", "1000", "--split", "-1000", "1000", "--json", str(out)])
    none, keep, evict, split = [json.loads(x) for x in out.read_text().splitlines()]
    assert keep["live"] == pytest.approx(1.0) and keep["kl"] == pytest.approx(0.0, abs=1e-5)
    assert keep["agreement"] == 1.0
    # everything evicted: each head holds the window (3 of the 64 keys, the window plus the query: 4)
    assert evict["live"] <= 4 / 64 + 1e-6 and evict["live"] < none["live"] <= keep["live"]
    local = set(none["local_layers"])
    for layer, frac in enumerate(split["live_per_layer"]):
        assert frac == pytest.approx(1.0) if layer in local else frac <= 4 / 64 + 1e-6


def test_policy_decode_reports_each_policy_and_the_kv_it_holds(capsys):
    bench("policy_decode").main(["--length", "40", "--budget", "8", "--steps", "3", "--heads", "2", "2", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert [x.split()[0] for x in lines] == ["streaming", "tova", "h2o", "quest"]
    held = {x.split()[0]: int(x.rsplit("(", 1)[1].split()[0]) for x in lines}
    assert held == {"streaming": 8, "tova": 8, "h2o": 8, "quest": 43}  # the budget; Quest keeps every token


def test_ship_retrofit_to_a_folder_keeps_the_adapter_and_rounds_the_update(tmp_path):
    from safetensors.torch import load_file, save_file

    run, to = tmp_path / "run", tmp_path / "step75"
    run.mkdir()
    weights = {"model.layers.0.self_attn.dms_proj_alpha.weight": torch.randn(2, 8),
               "model.layers.0.self_attn.q_proj.dms_lora_a": torch.randn(4, 8),
               "model.layers.0.self_attn.q_proj.dms_lora_b": torch.randn(8, 4)}
    save_file(weights, str(run / "dms_weights.safetensors"))
    (run / "dms_config.json").write_text(json.dumps({"dms_lora_rank": 4}))
    (run / "log.jsonl").write_text('{"step": 1}\n')
    bench("ship_retrofit").main([str(run), "label", "--to", str(to)])
    out = load_file(str(to / "dms_weights.safetensors"))
    assert out["model.layers.0.self_attn.dms_proj_alpha.weight"].dtype == torch.float32
    torch.testing.assert_close(out["model.layers.0.self_attn.dms_proj_alpha.weight"],
                               weights["model.layers.0.self_attn.dms_proj_alpha.weight"], rtol=0, atol=0)
    lora = out["model.layers.0.self_attn.q_proj.dms_lora_a"]
    assert lora.dtype == torch.bfloat16 and torch.equal(lora, weights["model.layers.0.self_attn.q_proj.dms_lora_a"].bfloat16())
    assert json.loads((to / "dms_config.json").read_text()) == {"dms_lora_rank": 4}
    assert (to / "log.jsonl").read_text() == '{"step": 1}\n'
    save_file({**weights, "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8)}, str(run / "dms_weights.safetensors"))
    with pytest.raises(SystemExit, match="never ship the base"):
        bench("ship_retrofit").main([str(run), "label", "--to", str(tmp_path / "bad")])


def test_checkpoint_layers_bench_measures_the_same_step_both_ways(tiny_with_tokenizer, tmp_path, capsys):
    out = tmp_path / "c.json"
    bench("checkpoint_layers").main(["--model", str(tiny_with_tokenizer), "--init-from", "", "--lora-rank", "2",
                                     "--seq-len", "24", "40", "--plain-up-to", "24", "--steps", "2",
                                     "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["seq_len"], r["checkpoint_layers"]) for r in rows] == [(24, False), (24, True), (40, True)]
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-5)  # the same steps, plain or checkpointed
    assert all(r["peak_rss_gib"] >= r["rss_after_load_gib"] > 0 and len(r["seconds_per_step"]) == 2 for r in rows)
    assert "checkpointed" in capsys.readouterr().out


def test_paired_gaps_one_text_at_a_time_match_dms_eval(tiny_with_tokenizer, tmp_path):
    from dms_runtime import load
    from dms_runtime.retrofit.evaluate import compare_methods

    out = tmp_path / "g.json"
    bench("paired_gaps").main(["-m", str(tiny_with_tokenizer), "--dms-window", "3", "--dms-offset", "0",
                               "--length", "40", "--sequences", "3", "--policy", "h2o", "tova",
                               "--blocks", "1", "8", "40", "--json", str(out)])
    res = json.loads(out.read_text())
    by = {r["method"]: r for r in res["rows"]}
    lm = load(tiny_with_tokenizer, dms={"dms_window_size": 3, "dms_initial_alpha_offset": 0.0}, merge_lora=False)
    dms_row, rows = compare_methods(lm, 40, sequences=3, policies=["h2o", "tova"])
    assert res["held_fraction"] == pytest.approx(dms_row.peak_live_fraction)
    for r in rows[1:]:  # the same texts, budget and means as dms eval, one text at a time
        assert by[r.method]["kl_per_token"] == pytest.approx(r.kl_per_token, abs=1e-6)
        assert by[r.method]["greedy_agreement"] == pytest.approx(r.greedy_agreement, abs=1e-6)
    for r in rows[2:]:
        assert by[r.method]["agreement_gap"]["8"][0] == pytest.approx(r.agreement_gap[0], abs=1e-9)
        assert sum(by[r.method]["agreement_gap_by_text"]) / 3 == pytest.approx(r.agreement_gap[0], abs=1e-6)
        whole = by[r.method]["agreement_gap"]["40"]  # resampling whole texts: no wider than the texts' spread
        assert min(by[r.method]["agreement_gap_by_text"]) - 1e-6 <= whole[1] <= whole[2] <= \
            max(by[r.method]["agreement_gap_by_text"]) + 1e-6
    prof = tmp_path / "e.json"  # after the budget fills: the gaps bench/error_profile.py measures
    bench("error_profile").main(["-m", str(tiny_with_tokenizer), "--dms-window", "3", "--dms-offset", "0",
                                 "--length", "40", "--sequences", "3", "--policy", "h2o", "tova", "--json", str(prof)])
    for p in json.loads(prof.read_text())[1:]:
        mine = by[p["method"]]
        assert p["budget"] == res["budget"] < 40
        assert mine["agreement_gap_after_fill"]["8"][0] == pytest.approx(p["agreement_gap_after_budget"][0], abs=1e-9)
        assert mine["kl_gap_after_fill"]["8"][0] == pytest.approx(p["kl_gap_after_budget"][0], abs=1e-6)
        assert mine["agreement_after_fill"] == pytest.approx(p["agreement_after_budget"], abs=1e-6)


def test_paired_gaps_runs_over_disjoint_texts_merge_into_one_run(tiny_with_tokenizer, tmp_path):
    common = ["-m", str(tiny_with_tokenizer), "--dms-window", "3", "--dms-offset", "0", "--length", "40",
              "--policy", "h2o", "streaming", "--blocks", "8", "40"]
    whole = tmp_path / "all.json"
    bench("paired_gaps").main(common + ["--sequences", "4", "--json", str(whole)])
    one = json.loads(whole.read_text())
    parts = [tmp_path / "b.json", tmp_path / "a.json"]  # in any order
    for f, skip in zip(parts, ("2", "0")):  # the second half first: merge sorts by text
        bench("paired_gaps").main(common + ["--sequences", "2", "--skip", skip, "--budget", str(one["budget"]),
                                            "--json", str(f)])
    merged = tmp_path / "m.json"
    bench("paired_gaps").main(["--merge", *map(str, parts), "--json", str(merged)])
    res = json.loads(merged.read_text())
    assert res["sequences"] == 4 and res["texts"] == [[0, 2], [2, 2]] and res["budget"] == one["budget"]
    assert res["held_fraction"] == pytest.approx(one["held_fraction"])
    for r, o in zip(res["rows"], one["rows"]):
        assert r["method"] == o["method"]
        assert r["kl_per_token"] == pytest.approx(o["kl_per_token"], abs=1e-6)
        assert r["greedy_agreement"] == pytest.approx(o["greedy_agreement"], abs=1e-6)
        if r["method"] != "dms":  # resampling texts from the parts is resampling whole texts in one run
            assert r["agreement_gap_by_text"] == pytest.approx(o["agreement_gap_by_text"], abs=1e-6)
            assert r["agreement_gap"]["text"] == pytest.approx(o["agreement_gap"]["40"], abs=1e-6)
            assert r["kl_gap"]["text"] == pytest.approx(o["kl_gap"]["40"], abs=1e-6)
            assert sum(n for n, _ in r["agreement_gap_by_file"].values()) == 4 and "file" in r["agreement_gap"]
            assert r["agreement_gap_after_fill"]["text"] == pytest.approx(o["agreement_gap_after_fill"]["40"], abs=1e-6)
    with pytest.raises(SystemExit, match="--merge: .*disjoint"):  # text 1 in both
        overlap = tmp_path / "o.json"
        bench("paired_gaps").main(common + ["--sequences", "2", "--skip", "1", "--budget", str(one["budget"]),
                                            "--json", str(overlap)])
        bench("paired_gaps").main(["--merge", str(parts[1]), str(overlap)])
    other = json.loads(parts[0].read_text()) | {"budget": one["budget"] + 1}
    (tmp_path / "x.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="--merge: .*budget"):
        bench("paired_gaps").main(["--merge", str(parts[1]), str(tmp_path / "x.json")])
    for bad, name in ((["--skip", "-1"], "--skip"), (["--budget", "1"], "--budget")):
        with pytest.raises(SystemExit, match=name):
            bench("paired_gaps").main(common + ["--sequences", "1"] + bad)


def test_paired_gaps_merge_resamples_files_with_all_their_texts():
    def part(skip, gaps):
        rows = [{"method": "dms", "kl_per_token": 0.1, "greedy_agreement": 0.9},
                {"method": "h2o", "kl_per_token": 0.2, "greedy_agreement": 0.8,
                 "agreement_gap_by_text": gaps, "kl_gap_by_text": [2 * g for g in gaps]}]
        return {"model": "m", "length": 8, "skip": skip, "sequences": len(gaps), "budget": 3,
                "held_fraction": 0.3, "rows": rows}

    merge = bench("paired_gaps").merge
    # texts 0-7 from two files; file a's texts all +1, file b's all 0
    res = merge([part(4, [0.0] * 4), part(0, [1.0] * 4)], sources=["a"] * 4 + ["b"] * 4 + ["c"])
    h2o = res["rows"][1]
    assert res["files"] == 2 and h2o["agreement_gap_by_file"] == {"a": [4, 1.0], "b": [4, 0.0]}
    gap, low, high = h2o["agreement_gap"]["file"]
    assert gap == 0.5 and low == 0.0 and high == 1.0  # two files: every resample is 0, 0.5 or 1
    assert h2o["kl_gap"]["file"][0] == 1.0
    text = h2o["agreement_gap"]["text"]  # eight texts taken one by one: a narrower interval
    assert text[0] == 0.5 and text[2] - text[1] < high - low
    assert res["rows"][0]["kl_per_token"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="sources: expected a file for each of the 8"):
        merge([part(0, [1.0] * 4), part(4, [0.0] * 4)], sources=["a"] * 7)


def test_paired_gaps_deferred_against_earlier_runs_is_scoring_the_policies_again(tiny_with_tokenizer, tmp_path):
    common = ["-m", str(tiny_with_tokenizer), "--dms-window", "3", "--dms-offset", "0", "--length", "40",
              "--blocks", "8", "40"]
    plain, live, reused = tmp_path / "p.json", tmp_path / "l.json", tmp_path / "r.json"
    bench("paired_gaps").main(common + ["--sequences", "3", "--policy", "h2o", "streaming", "--json", str(plain)])
    budget = json.loads(plain.read_text())["budget"]
    assert budget < 40
    deferred = common + ["--defer", "--budget", str(budget), "--skip", "1", "--sequences", "2"]
    bench("paired_gaps").main(deferred + ["--policy", "h2o", "streaming", "--json", str(live)])
    bench("paired_gaps").main(deferred + ["--against", str(plain), "--json", str(reused)])
    one, two = json.loads(live.read_text()), json.loads(reused.read_text())
    assert one["defer"] and two["defer"] and two["undeferred_check"] < 1e-6
    first = {r["method"]: r for r in json.loads(plain.read_text())["rows"]}
    mine = {r["method"]: r for r in one["rows"]}
    assert mine["undeferred"]["kl_by_text"] == pytest.approx(first["dms"]["kl_by_text"][1:], abs=1e-6)
    assert mine["dms"]["greedy_agreement"] >= mine["undeferred"]["greedy_agreement"] - 0.05
    assert one["held_fraction"] == pytest.approx(budget / 40)  # the pool (at or above DMS's peak) is the peak
    # query i reads what is held after i - 1 and its own key: never less than a policy holding budget + 1
    assert mine["undeferred"]["read_fraction"] < mine["dms"]["read_fraction"] <= 1
    assert mine["dms"]["read_fraction"] >= mine["h2o"]["read_fraction"] - 1e-9
    for r in two["rows"]:  # the policies from the earlier run equal scoring them here
        o = mine[r["method"]]
        for m in ("kl_per_token", "greedy_agreement", "kl_after_fill", "agreement_after_fill"):
            assert r[m] == pytest.approx(o[m], abs=1e-6), (r["method"], m)
        if r["method"] != "dms":
            for g in ("agreement_gap", "kl_gap", "agreement_gap_after_fill", "kl_gap_after_fill"):
                assert r[f"{g}_by_text"] == pytest.approx(o[f"{g}_by_text"], abs=1e-6), (r["method"], g)
    merged = bench("paired_gaps").merge([two])
    assert [r["method"] for r in merged["rows"]] == ["dms", "undeferred", "h2o", "streaming"] and merged["defer"]
    with pytest.raises(ValueError, match="budget"):  # deferred and not: never merged
        bench("paired_gaps").merge([two, json.loads(plain.read_text()) | {"skip": 3}])
    for bad, name in ((["--against", str(plain)], "--against: expected --defer"),
                      (["--defer"], "--budget"),
                      (["--defer", "--budget", str(budget + 1), "--against", str(plain)], "--against: .*budget"),
                      (["--defer", "--budget", str(budget), "--skip", "2", "--against", str(plain)],
                       "--against: no .* for every text 2..3"),
                      (["--defer-order", "logit"], "--defer-order: expected --defer"),
                      (["--defer", "--budget", str(budget), "--against", str(plain), "--dms-offset", "50"],
                       "--against: expected runs of this model with these settings")):
        with pytest.raises(SystemExit, match=name):
            bench("paired_gaps").main(common + ["--sequences", "2"] + bad)
    # the pool dropping the marks the adapter is surest of first: recorded, scored, never merged with the oldest-first
    by_logit = tmp_path / "o.json"
    bench("paired_gaps").main(deferred + ["--defer-order", "logit", "--against", str(plain), "--json", str(by_logit)])
    three = json.loads(by_logit.read_text())
    assert three["defer_order"] == "logit" and "defer_order" not in two
    rows3 = {r["method"]: r for r in three["rows"]}
    assert rows3["undeferred"]["kl_by_text"] == pytest.approx(mine["undeferred"]["kl_by_text"], abs=1e-6)
    assert rows3["dms"]["kl_by_text"] != pytest.approx(mine["dms"]["kl_by_text"], abs=1e-6)
    assert bench("paired_gaps").merge([three])["defer_order"] == "logit"
    with pytest.raises(ValueError, match="budget"):
        bench("paired_gaps").merge([two, three | {"skip": 3}])
