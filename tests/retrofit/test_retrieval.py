"""The calibrated retrieval suite: scoring, seeded cases at the requested lengths and depths, the
vanilla calibration, and the policies' greedy-generation masks against step-by-step rules."""

import json

import pytest
import torch

import dms_runtime as dr
from dms_runtime.cli import main
from dms_runtime.retrofit import retrieval as R
from dms_runtime.retrofit.policies import PolicyCache, evicting_step, policy_generate, streaming_mask
from test_policies import naive_evicting, naive_quest


@pytest.fixture(scope="module")
def tok(smollm2_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_folder))


# ---------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("text,want", [
    (" 48213. Remember it.", 1.0),
    ("48213", 1.0),
    (" The pass key is 48213.", 1.0),
    (" 4821", 0.0),  # a prefix of the key is not the key
    (" 482134", 0.0),
    (" 11111 then 48213", 0.0),  # the first number generated is the answer
    (" I do not know.", 0.0),
    ("", 0.0),
    (None, 0.0),
])
def test_single_answer_is_the_first_number(text, want):
    for task in ("passkey", "multikey", "vartrack"):
        assert R.score(task, ["48213"], text) == want


@pytest.mark.parametrize("text,want", [
    (" 111111, 222222 and 333333.", 1.0),
    (" 333333, 111111, 222222", 1.0),  # any order
    (" 111111, 999999, 222222", 2 / 3),
    (" 111111, 111111, 222222, 333333", 1.0),  # a repeat does not use up a place
    (" 999999, 888888, 777777, 111111, 222222, 333333", 0.0),  # listing more numbers earns nothing
    (" 222222.", 1 / 3),
    (" none", 0.0),
])
def test_multivalue_partial_credit(text, want):
    assert R.score("multivalue", ["111111", "222222", "333333"], text) == pytest.approx(want)


def test_score_arguments_are_checked():
    with pytest.raises(ValueError, match="task: expected one of"):
        R.score("needle", ["1"], "1")
    with pytest.raises(ValueError, match="answers"):
        R.score("passkey", [], "1")


# ---------------------------------------------------------------------------- cases


@pytest.mark.parametrize("task", R.TASKS)
@pytest.mark.parametrize("length", [300, 1024, 8192])
def test_cases_have_the_requested_length_and_depths(tok, task, length):
    cases = R.make_cases(tok, task, length, n=5, seed=3)
    longest_sentence = max(len(tok(" " + s, add_special_tokens=False)["input_ids"]) for s in R.HAYSTACK)
    head = len(tok(R._INTRO[task])["input_ids"])
    assert [c.depth for c in cases] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for c in cases:
        ids = c.prompt_ids
        assert length - longest_sentence < len(ids) <= length
        text = tok.decode(ids)
        assert text.startswith(R._INTRO[task][:30])
        for a in c.answers:
            assert a in text
        # the needles' tokens are where the case says; the asked one sits at its depth in the haystack
        spans = sorted(c.needle_spans + c.distractor_spans)
        start = c.needle_spans[0][0]
        before = start - head - sum(e - s for s, e in spans if s < start)
        assert abs(before - c.depth * c.haystack_tokens) <= longest_sentence, (before, c.depth, c.haystack_tokens)
        assert len(ids) == head + c.haystack_tokens + sum(e - s for s, e in spans) + _question_len(tok, c)
        needle = tok.decode(ids[start: c.needle_spans[0][1]])
        if task == "passkey":
            assert needle == f" The pass key is {c.answers[0]}. Remember it. {c.answers[0]} is the pass key."
        elif task == "vartrack":
            assert needle.startswith(" VAR ") and needle.endswith(f" = {c.answers[0]}.")
            assert c.needle_spans == sorted(c.needle_spans)  # the chain in order
            assert all(tok.decode(ids[s:e]).startswith(" VAR ") for s, e in spans)
        else:
            assert needle.startswith(" One of the special magic numbers for ") and needle.endswith(f"{c.answers[0]}.")
            assert all(tok.decode(ids[s:e]).startswith(" One of the special magic") for s, e in spans)
        if task != "passkey":
            assert c.distractor_spans and not set(c.distractor_spans) & set(c.needle_spans)
            for s, e in c.distractor_spans:
                assert not any(a in tok.decode(ids[s:e]) for a in c.answers)


def _question_len(tok, case):
    text = tok.decode(case.prompt_ids)
    return len(tok(text[text.rindex("\n\nNow, what"):], add_special_tokens=False)["input_ids"])


def test_cases_are_seeded(tok):
    a = R.make_cases(tok, "multivalue", 512, n=4, seed=1)
    assert [c.to_dict() for c in a] == [c.to_dict() for c in R.make_cases(tok, "multivalue", 512, n=4, seed=1)]
    b = R.make_cases(tok, "multivalue", 512, n=4, seed=2)
    assert [c.answers for c in a] != [c.answers for c in b]
    assert len(set(a[0].answers)) == 3 and all(len(x) == 6 for x in a[0].answers)


def test_cases_leave_room_for_the_answer_in_the_context(tok):
    for task in R.TASKS:
        c = R.make_cases(tok, task, 8192, n=1, context=8192)[0]
        assert c.length == 8192 and 8192 - c.max_new_tokens - 8 < len(c.prompt_ids) <= 8192 - c.max_new_tokens
    assert len(R.make_cases(tok, "passkey", 1024, n=1, context=8192)[0].prompt_ids) > 1024 - 8


def test_case_arguments_are_checked(tok):
    with pytest.raises(ValueError, match="task"):
        R.make_case(tok, "haystack", 512, 0.5, __import__("random").Random(0))
    with pytest.raises(ValueError, match="depth"):
        R.make_case(tok, "passkey", 512, 1.5, __import__("random").Random(0))
    with pytest.raises(ValueError, match="length: 40 tokens cannot hold"):
        R.make_case(tok, "multivalue", 40, 0.5, __import__("random").Random(0))
    with pytest.raises(ValueError, match="n: expected >= 1"):
        R.make_cases(tok, "passkey", 512, n=0)


# ---------------------------------------------------------------------------- calibration


def test_informative_rule():
    got = R.informative({("passkey", 1024): 0.85, ("passkey", 2048): 0.8, ("vartrack", 1024): 0.75})
    assert got == {("passkey", 1024): True, ("passkey", 2048): True, ("vartrack", 1024): False}
    with pytest.raises(ValueError, match="threshold"):
        R.informative({}, 1.5)


def test_suite_runs_methods_only_where_vanilla_is_informative(tiny_with_tokenizer, monkeypatch):
    """Vanilla is measured once per (task, length) on the base; below the threshold the task is
    uninformative and neither DMS nor a policy is run there."""
    from dms_runtime.retrofit.evaluate import RetrievalSuite, mean_informative

    lm = dr.load(tiny_with_tokenizer, dms={"dms_window_size": 3})
    calls = []

    def fake_generate(lm_, cases, evict=True, defer_fraction=None):  # vanilla right on passkey, wrong on
        # vartrack; DMS always right, deferred DMS right on the first case only
        calls.append(("dms-deferred" if defer_fraction else "dms" if evict else "vanilla", cases[0].task))
        if defer_fraction:
            return [f" {c.answers[0]}" if i == 0 else " 0" for i, c in enumerate(cases)], defer_fraction / 2
        right = evict or cases[0].task == "passkey"
        return [f" {c.answers[0]}" if right else " 0" for c in cases], (0.125 if evict else 1.0)

    def fake_policy(lm_, cases, policy, fraction):
        calls.append((policy, cases[0].task))
        return [" 0" for _ in cases], [fraction for _ in cases]

    monkeypatch.setattr(R, "generate_answers", fake_generate)
    monkeypatch.setattr(R, "policy_answers", fake_policy)
    suite = RetrievalSuite(["passkey", "vartrack"], cases=3, seed=0)
    rows = suite.run(lm, 200, "m1", "base", policies=["tova"], budget_fraction=0.25)
    by = {(r.method, r.task): r for r in rows}
    assert by[("vanilla", "passkey")].accuracy == 1.0 and by[("vanilla", "passkey")].informative
    assert by[("vanilla", "vartrack")].accuracy == 0.0 and not by[("vanilla", "vartrack")].informative
    assert by[("dms", "passkey")].accuracy == 1.0 and by[("tova", "passkey")].accuracy == 0.0
    assert by[("dms", "vartrack")].accuracy is None and by[("tova", "vartrack")].accuracy is None
    assert ("dms", "vartrack") not in calls and ("tova", "vartrack") not in calls
    assert by[("tova", "passkey")].budget_fraction == 0.25 and by[("tova", "passkey")].held_fraction == 0.25
    assert by[("dms", "passkey")].held_fraction == 0.125 and by[("dms", "vartrack")].held_fraction is None
    # a second model on the same base reuses vanilla's score and the same cases
    rows2 = suite.run(lm, 200, "m2", "base")
    assert [r.method for r in rows2] == ["dms", "dms"] and calls.count(("vanilla", "passkey")) == 1
    assert mean_informative(rows + rows2, "dms", "m2", 200) == 1.0
    assert mean_informative(rows + rows2, "vanilla", "m2", 200) == 1.0
    assert mean_informative(rows, "tova", "m1", 200) == 0.0
    rows3 = suite.run(lm, 200, "m3", "base", dms=False, defer_fraction=0.5)
    deferred = {r.task: r for r in rows3}
    assert [r.method for r in rows3] == ["dms-deferred", "dms-deferred"]
    assert deferred["passkey"].accuracy == pytest.approx(1 / 3) and deferred["vartrack"].accuracy is None
    assert deferred["passkey"].budget_fraction == 0.5 and deferred["passkey"].held_fraction == 0.25
    assert ("dms-deferred", "vartrack") not in calls
    with pytest.raises(ValueError, match="defer_fraction"):
        suite.run(lm, 200, "m3", "base", defer_fraction=1.5)
    with pytest.raises(ValueError, match="tasks"):
        RetrievalSuite(["haystack"])


# ---------------------------------------------------------------------------- policies, generated


def _step_by_step(policy, prefill, q, k, v, budget, page=4):
    """Drive a PolicyCache as generation does: the prefill, then one query per call."""
    backend = PolicyCache(policy, budget, sinks=2, page_size=page, record=True)
    hkv, g, t, d = q.shape
    flat = lambda x: x.reshape(1, hkv * g, -1, d)  # noqa: E731
    outs = [backend.attend(0, flat(q[:, :, :prefill]), k[None, :, :prefill], v[None, :, :prefill], None)]
    for i in range(prefill, t):
        outs.append(backend.attend(0, flat(q[:, :, i: i + 1]), k[None, :, i: i + 1], v[None, :, i: i + 1], None))
    return backend, torch.cat(outs, 2)


@pytest.mark.parametrize("policy", ["streaming", "tova", "h2o", "quest"])
@pytest.mark.parametrize("t,prefill,budget,g", [(20, 5, 6, 2), (23, 1, 4, 3), (17, 12, 8, 1), (12, 12, 4, 2),
                                                (15, 3, 32, 2)])
def test_generation_masks_match_step_by_step(policy, t, prefill, budget, g):
    gen = torch.Generator().manual_seed(t * 13 + prefill)
    q = torch.randn(2, g, t, 8, generator=gen)
    k, v = torch.randn(2, t, 8, generator=gen), torch.randn(2, t, 8, generator=gen)
    backend, out = _step_by_step(policy, prefill, q, k, v, budget)
    if policy in ("tova", "h2o"):
        want = naive_evicting(policy, q, k, budget)
    elif policy == "quest":
        want = naive_quest(q, k, budget, 4)
    else:
        want = streaming_mask(t, budget, 2).expand(2, t, t)
    assert torch.equal(backend.masks[0], want)
    # the outputs are attention over exactly those keys
    s = torch.einsum("hgid,hjd->hgij", q, k) / 8 ** 0.5
    ref = torch.softmax(s.masked_fill(~want[:, None], float("-inf")), -1) @ v[:, None]
    torch.testing.assert_close(out[0].view(2, g, t, 8), ref, atol=1e-5, rtol=1e-5)
    assert backend.reads == int(want.sum())
    held = t if policy == "quest" else min(t, budget)
    assert backend.held_peak == held * 2
    # the evicting policies hold only what they keep: K/V, positions (ascending) and H2O's scores
    assert backend.k[0].shape == backend.v[0].shape == (2, held, 8)
    if policy != "quest":
        pos = backend.pos[0]
        assert pos.shape == (2, held) and bool((pos[:, 1:] > pos[:, :-1]).all())
        if t > prefill:  # the keys the last query read, less the one its policy then evicted
            assert all(bool(want[h, -1, pos[h]].all()) for h in range(2))
        torch.testing.assert_close(backend.k[0], k.gather(1, pos[..., None].expand(-1, -1, 8)))
    assert (backend.acc.get(0) is not None) == (policy == "h2o")


def test_evicting_step_checks_positions():
    q, k = torch.randn(2, 1, 4), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="pos"):
        evicting_step("tova", q, k, torch.arange(2).expand(2, -1), None, 2)


def test_policy_cache_checks_its_calls():
    backend = PolicyCache("tova", 4)
    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 1, 5, 4)
    backend.attend(0, q, k, k, None)
    with pytest.raises(ValueError, match="one token per call"):
        backend.attend(0, q, k, k, None)
    with pytest.raises(ValueError, match="batch"):
        PolicyCache("tova", 4).attend(0, q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), k, None)


def test_policy_generation_with_room_for_everything_is_vanilla(tiny_with_tokenizer):
    lm = dr.load(tiny_with_tokenizer)
    prompt = list(range(5, 45))
    want = dr.generate(lm, [prompt], max_new_tokens=6, backend="oracle", ignore_eos=True).token_ids[0]
    for policy in ("streaming", "tova", "h2o", "quest"):
        got, backend = policy_generate(lm.model, prompt, policy, 64, 6)
        assert got == want, policy
    got, backend = policy_generate(lm.model, prompt, "tova", 8, 6)
    assert len(got) == 6 and backend.held_peak == 8 * lm.config.num_kv_heads * lm.config.num_layers


# ---------------------------------------------------------------------------- dms eval


def test_eval_cli_retrieval(tiny_with_tokenizer, capsys, tmp_path):
    """A random model answers nothing: every point is uninformative and nothing else runs; with the
    threshold at 0 DMS and the policies run on the same cases and the figure has its accuracy row."""
    common = ["eval", "-m", str(tiny_with_tokenizer), "--dms-window", "3", "--lengths", "256", "--sequences", "1",
              "--retrieval", "passkey", "multivalue", "--retrieval-cases", "2", "--json"]
    assert main(common + ["--policy", "streaming"]) == 0
    rows = json.loads(capsys.readouterr().out)["retrieval"]
    assert [(r["method"], r["task"]) for r in rows] == [("vanilla", "passkey"), ("dms", "passkey"),
                                                       ("streaming", "passkey"), ("vanilla", "multivalue"),
                                                       ("dms", "multivalue"), ("streaming", "multivalue")]
    assert all(not r["informative"] and (r["accuracy"] is None) == (r["method"] != "vanilla") for r in rows)
    plot = tmp_path / "p.png"
    assert main(common + ["--policy", "streaming", "h2o", "--calibration-threshold", "0", "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert all(r["informative"] and 0 <= r["accuracy"] <= 1 for r in out["retrieval"])
    assert {r["method"] for r in out["retrieval"]} == {"vanilla", "dms", "streaming", "h2o"}
    # DMS's rows carry the KV it held (this random model evicts), vanilla's the dense cache
    assert all(0 < r["held_fraction"] < 1 for r in out["retrieval"] if r["method"] == "dms")
    assert all(r["held_fraction"] == 1.0 for r in out["retrieval"] if r["method"] == "vanilla")
    assert all(r["retrieval_accuracy"] is not None for r in out["methods"])
    # matching DMS's reads: each policy's rows carry the budget its fidelity row was given, as a fraction
    assert main(common + ["--policy", "streaming", "h2o", "--calibration-threshold", "0", "--match", "read"]) == 0
    out = json.loads(capsys.readouterr().out)
    budgets = {r["method"]: r["budget"] for r in out["methods"] if r["budget"]}
    assert set(budgets) == {"streaming", "h2o"}
    for r in out["retrieval"]:
        if r["method"] in budgets:
            assert r["budget_fraction"] == budgets[r["method"]] / 256
    assert main(common[:-1] + ["--calibrate"]) == 0
    text = capsys.readouterr().out
    assert "uninformative" in text and "multivalue" in text and "KL/token" not in text


def test_eval_cli_several_models_give_curves(tiny_with_tokenizer, capsys, tmp_path):
    plot = tmp_path / "curves.png"
    args = ["eval", "-m", str(tiny_with_tokenizer), str(tiny_with_tokenizer), "--lengths", "32",
            "--sequences", "1", "--policy", "tova", "--json", "--plot", str(plot)]
    assert main(args[:4] + ["--dms-window", "3"] + args[4:]) == 0
    methods = json.loads(capsys.readouterr().out)["methods"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert [m["method"] for m in methods] == ["vanilla", "dms", "tova", "dms", "tova"]  # vanilla once per length
