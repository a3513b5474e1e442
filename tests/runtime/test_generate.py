"""The oracle runtime: cached decoding equals the definition; batching, sampling, stopping, stats."""

import functools

import pytest
import torch

import dms_runtime as dr
from dms_kernels import reference as ref
from dms_runtime.models.full_sequence import FullSequenceAttention
from dms_runtime.sampling import Sampler, SamplingParams

# offset 0: the logit's sign is the sign of a q channel, so about half of all tokens are evicted
EVICTING = {"dms_window_size": 3, "dms_initial_alpha_offset": 0.0, "dms_alpha_scale": 100.0}


def prompts(n, lo=1, hi=30, vocab=131):
    return [torch.randint(0, vocab, (int(torch.randint(lo, hi + 1, ())),)).tolist() for _ in range(n)]


@pytest.fixture(params=["paged", "oracle"])
def gen(request):
    """generate() through each runtime: the paged engine and the dense oracle."""
    return functools.partial(dr.generate, backend=request.param)


@pytest.fixture(params=["llama", "qwen3", "llama-sinks"])
def dms_model(request, tiny_factory):
    arch, _, sinks = request.param.partition("-")
    folder, _ = tiny_factory(arch=arch, extra_config={**EVICTING, **({"dms_sink_tokens": 2} if sinks else {})})
    return dr.load(folder)


def test_greedy_equals_transformers_generate(tiny_factory, gen):
    folder, hf = tiny_factory(arch="qwen2")
    lm = dr.load(folder)
    p = prompts(1, 5, 20)[0]
    res = gen(lm, [p], max_new_tokens=24, ignore_eos=True)
    with torch.no_grad():
        ids = torch.tensor([p])
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
    assert res.token_ids[0] == theirs


def test_cached_decoding_equals_the_definition(dms_model, gen):
    """Teacher-forced full-sequence forward (reference dms_attention) reproduces every greedy token,
    and the live-token stats equal reference.live_tokens over the recorded decisions."""
    lm = dms_model
    ps = prompts(3, 1, 25)
    res = gen(lm, ps, max_new_tokens=20, ignore_eos=True)
    evicted_somewhere = False
    for p, out in zip(ps, res.outputs):
        seq = p + out.token_ids[:-1]  # everything that went through the model
        backend = FullSequenceAttention(3, record=True)
        with torch.no_grad():
            logits = lm.model(torch.tensor([seq]), torch.arange(len(seq))[None], backend)[0]
        assert logits[len(p) - 1 :].argmax(-1).tolist() == out.token_ids
        for layer in range(lm.config.num_layers):
            d = backend.decisions[layer]
            evicted_somewhere |= bool(d.any())
            assert not d[..., : lm.config.dms.sink_tokens].any()  # dms_sink_tokens: never evicted
            live = ref.live_tokens(d, 3, len(seq) - 1)[0].tolist()
            assert out.live_tokens[layer] == live
    assert evicted_somewhere
    assert res.stats.kv.compression_ratio > 1.0


def test_batch_of_ragged_prompts_equals_one_at_a_time(dms_model, gen):
    ps = prompts(4, 1, 30)
    together = gen(dms_model, ps, max_new_tokens=12, ignore_eos=True)
    for i, p in enumerate(ps):
        alone = gen(dms_model, [p], max_new_tokens=12, ignore_eos=True)
        assert alone.token_ids[0] == together.token_ids[i]
        assert alone.outputs[0].live_tokens == together.outputs[i].live_tokens


def test_sampling_is_reproducible_and_filters_work(tiny_factory, gen):
    folder, _ = tiny_factory(arch="llama")
    lm = dr.load(folder)
    ps = prompts(2, 3, 10)
    a = gen(lm, ps, max_new_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    b = gen(lm, ps, max_new_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    c = gen(lm, ps, max_new_tokens=16, temperature=1.0, seed=8, ignore_eos=True)
    g = gen(lm, ps, max_new_tokens=16, ignore_eos=True)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    k1 = gen(lm, ps, max_new_tokens=16, temperature=0.7, top_k=1, seed=1, ignore_eos=True)
    p0 = gen(lm, ps, max_new_tokens=16, temperature=0.7, top_p=1e-6, seed=1, ignore_eos=True)
    assert k1.token_ids == g.token_ids == p0.token_ids


def test_sampler_respects_top_k_and_top_p():
    logits = torch.tensor([4.0, 3.0, 2.0, -1.0, -2.0])
    probs = torch.softmax(logits, 0)
    s = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0), 1)
    assert {s(0, logits) for _ in range(300)} == {0, 1}
    # top_p = 0.8: tokens 0 (0.66) and 1 (0.24) are needed to pass 0.8
    assert probs[0] < 0.8 < probs[0] + probs[1]
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=0), 1)
    assert {s(0, logits) for _ in range(300)} == {0, 1}
    s = Sampler(SamplingParams(temperature=1.0, seed=0), 1)
    draws = torch.tensor([s(0, logits) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=5).float() / 4000
    assert (freq - probs).abs().max() < 0.03


def test_stops_at_eos_and_stop_tokens_and_length(tiny_factory, gen):
    folder, _ = tiny_factory(arch="llama")
    lm = dr.load(folder)
    p = prompts(1, 4, 8)
    free = gen(lm, p, max_new_tokens=10, ignore_eos=True).token_ids[0]
    target = free[3]
    first = free.index(target)
    lm.model.config.eos_token_ids = (target,)
    res = gen(lm, p, max_new_tokens=10)
    assert res.token_ids[0] == free[: first + 1] and res.outputs[0].finish_reason == "eos"
    lm.model.config.eos_token_ids = ()
    res = gen(lm, p, max_new_tokens=10, stop_token_ids=[target])
    assert res.token_ids[0] == free[: first + 1] and res.outputs[0].finish_reason == "stop"
    res = gen(lm, p, max_new_tokens=5)
    assert res.token_ids[0] == free[:5] and res.outputs[0].finish_reason == "length"


def test_stats_account_for_every_token(dms_model, gen):
    ps = prompts(3, 2, 20)
    res = gen(dms_model, ps, max_new_tokens=9, ignore_eos=True)
    st, cfg = res.stats, dms_model.config
    assert st.prompt_tokens == sum(map(len, ps)) and st.generated_tokens == 27
    positions = sum(len(p) + 9 - 1 for p in ps)  # the last sampled token never enters the cache
    assert st.kv.dense_tokens == cfg.num_layers * cfg.num_kv_heads * positions
    assert st.kv.live_tokens == sum(sum(map(sum, o.live_tokens)) for o in res.outputs)
    per_token = 2 * cfg.head_dim * 4
    assert st.kv.dense_bytes == st.kv.dense_tokens * per_token and st.kv.live_bytes == st.kv.live_tokens * per_token
    assert st.kv.compression_ratio == pytest.approx(st.kv.dense_tokens / st.kv.live_tokens)
    assert st.eviction and st.window == 3 and st.tokens_per_s > 0
    assert "compression" in st.line()


def test_vanilla_holds_everything(tiny_factory, gen):
    folder, _ = tiny_factory(arch="llama")
    res = gen(dr.load(folder), prompts(2), max_new_tokens=4, ignore_eos=True)
    assert res.stats.kv.compression_ratio == 1.0 and not res.stats.eviction


def test_bad_requests_are_refused(tiny_factory):
    folder, _ = tiny_factory(arch="llama")
    lm = dr.load(folder)
    with pytest.raises(ValueError, match=r"prompts\[1\]: 500 prompt tokens \+ max_new_tokens=20 exceed .* 512"):
        dr.generate(lm, [[1, 2], [3] * 500], max_new_tokens=20)
    with pytest.raises(ValueError, match="prompts: expected a non-empty list"):
        dr.generate(lm, [])
    with pytest.raises(ValueError, match=r"prompts\[0\]: token ids must lie in \[0, 131\)"):
        dr.generate(lm, [[1, 131]])
    with pytest.raises(ValueError, match=r"prompts\[0\]: text needs a tokenizer"):
        dr.generate(lm, ["hello"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        dr.generate(lm, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        dr.generate(lm, [[1]], top_p=0.0)
    with pytest.raises(ValueError, match="backend"):
        dr.generate(lm, [[1]], backend="magic")
    with pytest.raises(ValueError, match="dtype"):
        dr.load(folder, dtype="int8")
    with pytest.raises(FileNotFoundError, match="neither an embedded model"):
        dr.load("no-such-model")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda' requested but no CUDA device"):
            dr.load(folder, device="cuda")


def test_non_finite_logits_are_reported(tiny_factory, gen):
    folder, _ = tiny_factory(arch="llama")
    lm = dr.load(folder)
    with torch.no_grad():
        lm.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="logits: non-finite values at generation step 0"):
        gen(lm, [[1, 2, 3]], max_new_tokens=3)


def test_stop_strings_cut_the_text(tiny_with_tokenizer, gen):
    lm = dr.load(tiny_with_tokenizer)
    free = gen(lm, ["Hello there"], max_new_tokens=12, ignore_eos=True, chat=False)
    text = free.texts[0]
    assert len(text) > 4
    stop = text[2:4]
    res = gen(lm, ["Hello there"], max_new_tokens=12, ignore_eos=True, chat=False, stop=[stop])
    assert res.outputs[0].finish_reason == "stop"
    assert stop not in res.texts[0] and text.startswith(res.texts[0])
    assert len(res.token_ids[0]) <= len(free.token_ids[0])


def test_logit_exactly_zero_keeps_the_token(tiny_factory, gen):
    # zero-initialised adapter + offset 0: every logit is exactly 0.0, and 0 is not > 0
    folder, _ = tiny_factory(arch="llama", extra_config={"dms_window_size": 1, "dms_separate_alpha": True,
                                                          "dms_initial_alpha_offset": 0.0})
    lm = dr.load(folder)
    vanilla = dr.load(folder, dms={"dms_disable_eviction": True})
    ps = prompts(2, 5, 12)
    res = gen(lm, ps, max_new_tokens=6, ignore_eos=True)
    assert res.stats.eviction and res.stats.kv.live_tokens == res.stats.kv.dense_tokens
    assert res.token_ids == gen(vanilla, ps, max_new_tokens=6, ignore_eos=True).token_ids
