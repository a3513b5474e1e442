"""The paged runtime gives the oracle runtime's tokens; engine features: continuous batching,
chunked prefill, forks sharing pages, preemption, pool limits."""

import pytest
import torch

import dms_runtime as dr
from dms_runtime.engine import Engine, majority_vote
from dms_runtime.paged import PagedConfig
from dms_runtime.sampling import SamplingParams

W = 8
EVICTING = {"dms_window_size": W, "dms_initial_alpha_offset": 0.0}


def prompts(n, lo, hi, vocab=131):
    return [torch.randint(0, vocab, (int(torch.randint(lo, hi + 1, ())),)).tolist() for _ in range(n)]


@pytest.fixture(scope="module", params=["llama", "qwen3-adapter"])
def lm(request, tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from conftest import save_tiny

    folder = tmp_path_factory.mktemp("paged")
    if request.param == "llama":
        save_tiny(folder, "llama", seed=3, extra_config=EVICTING)
        model = dr.load(folder, dtype=torch.float64)
    else:
        save_tiny(folder, "qwen3", seed=4, head_dim=16, extra_config={**EVICTING, "dms_separate_alpha": True})
        model = dr.load(folder, dtype=torch.float64)
        with torch.no_grad():  # a trained-looking adapter: random, so decisions vary per token
            for layer in model.model.model.layers:
                layer.self_attn.dms_proj_alpha.weight.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("batch,page_size,chunk", [(1, 16, 512), (3, 1, 7), (5, 5, 16), (16, 16, 13), (16, 3, 512)])
def test_same_tokens_as_reference(lm, batch, page_size, chunk):
    ps = prompts(batch, 2 * W, 5 * W)  # prompt + 24 generated >= 4 windows
    ref = dr.generate(lm, ps, max_new_tokens=24, ignore_eos=True, backend="oracle")
    got = dr.generate(lm, ps, max_new_tokens=24, ignore_eos=True,
                      paged=PagedConfig(page_size=page_size, prefill_chunk=chunk, max_seqs=batch))
    assert got.token_ids == ref.token_ids
    assert [o.live_tokens for o in got.outputs] == [o.live_tokens for o in ref.outputs]
    assert ref.stats.kv.compression_ratio > 1.2  # eviction really happened
    assert got.stats.extra["pool_final_bytes"] == 0
    assert 0 < got.stats.extra["kv_bytes_read_per_decode_step"] and got.stats.extra["kv_bytes_read"] > 0
    if page_size == 1:  # no page rounding: the pool holds strictly less than a dense cache
        assert got.stats.extra["pool_peak_bytes"] < got.stats.extra["dense_peak_bytes"]


def test_continuous_batching_with_arrivals(lm):
    ps = prompts(6, 3, 40)
    ref = dr.generate(lm, ps, max_new_tokens=20, ignore_eos=True, backend="oracle")
    eng = Engine(lm.model, PagedConfig(page_size=4, prefill_chunk=9, max_seqs=4, max_model_len=64))
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    ids, streamed, i = [], {}, 0
    while i < len(ps) or eng.has_unfinished():
        if i < len(ps) and (i < 2 or eng.stats.steps % 3 == 0):
            ids.append(eng.add_request(ps[i], params)[0])  # new requests join while others decode
            i += 1
        for out in eng.step():
            streamed.setdefault(out.request_id, []).append(out.token)
        eng.cache.check_invariants()
    assert [eng.outputs[r].token_ids for r in ids] == ref.token_ids
    assert [streamed[r] for r in ids] == ref.token_ids
    assert eng.cache.pages_in_use == 0


def test_forked_samples_share_pages_and_match_separate_requests(lm):
    p = prompts(1, 30, 30)[0]
    forked = dr.generate(lm, [p], n=4, max_new_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    separate = dr.generate(lm, [p] * 4, max_new_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    assert forked.token_ids == separate.token_ids
    assert len({tuple(t) for t in forked.token_ids}) > 1
    # sharing: after the prefill, 4 samples hold fewer pages than 4 separate copies
    eng = Engine(lm.model, PagedConfig(page_size=4, max_seqs=4, max_model_len=64))
    eng.add_request(p, SamplingParams(max_new_tokens=3, ignore_eos=True), n=4)
    eng.step()
    one = Engine(lm.model, PagedConfig(page_size=4, max_seqs=1, max_model_len=64))
    one.add_request(p, SamplingParams(max_new_tokens=3, ignore_eos=True))
    one.step()
    assert len(eng.scheduler.running) == 4
    assert eng.cache.pages_in_use < 4 * one.cache.pages_in_use
    shared = (eng.cache.page_ref > 1).sum().item()
    assert shared > 0
    eng.cache.check_invariants()
    eng.run()
    assert eng.cache.pages_in_use == 0


def test_greedy_samples_all_equal_and_majority_vote():
    texts = ["so the answer is \\boxed{42}", "I get 41", "it is 42.", "\\boxed{7}", "answer: 42"]
    assert majority_vote(texts) == ("42", {"42": 3, "41": 1, "7": 1})
    assert majority_vote(["no numbers here"]) == (None, {})


def test_preemption_recomputes_and_keeps_tokens(lm):
    # five short prompts are all admitted, then grow past the pool: someone must be preempted
    ps = prompts(5, 4, 4)
    ref = dr.generate(lm, ps, max_new_tokens=40, ignore_eos=True, backend="oracle")
    L, H = lm.config.num_layers, lm.config.num_kv_heads
    pages = L * H * 25  # about 100 tokens per list in all, for 5 sequences of 44 tokens
    eng = Engine(lm.model, PagedConfig(page_size=4, prefill_chunk=16, max_seqs=5, max_model_len=64, num_pages=pages))
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    ids = [eng.add_request(p, params)[0] for p in ps]
    while eng.has_unfinished():
        eng.step()
        eng.cache.check_invariants()
    assert [eng.outputs[r].token_ids for r in ids] == ref.token_ids
    assert eng.scheduler.preemptions > 0
    assert eng.cache.pages_in_use == 0


def test_request_larger_than_the_pool_is_refused_before_it_starts(lm):
    eng = Engine(lm.model, PagedConfig(page_size=4, max_seqs=2, max_model_len=64, num_pages=50))
    with pytest.raises(ValueError, match="request: .* may need up to .* pages .* whole pool has 50 pages"):
        eng.add_request(list(range(40)), SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="exceed max_model_len=64"):
        eng.add_request(list(range(60)), SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="n: expected an int >= 1"):
        eng.add_request([1, 2], n=0)
    assert not eng.has_unfinished()


def test_attention_backend_is_selectable_by_name(lm):
    eng = Engine(lm.model, PagedConfig(attention="torch", max_model_len=32))
    assert eng.attention_name == "torch"
    with pytest.raises(ValueError, match="attention: unknown backend 'nope'"):
        Engine(lm.model, PagedConfig(attention="nope", max_model_len=32))


@pytest.mark.parametrize("field,value", [("page_size", 0), ("max_seqs", -1), ("prefill_chunk", 1.5), ("num_pages", 0)])
def test_bad_paged_config(field, value):
    with pytest.raises(ValueError, match=field):
        PagedConfig(**{field: value})
