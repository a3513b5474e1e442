"""The engine survives a failing request: it ends with an error, its pages are freed, the others go on."""

import pytest
import torch

import dms_runtime as dr
from dms_runtime import Engine, PagedConfig, SamplingParams

EVICTING = {"dms_window_size": 3, "dms_initial_alpha_offset": 0.0}
MARK = 7  # prompts starting with this token get non-finite logits


class NaNForMarked(torch.nn.Module):
    """The model, except that rows whose first new token is MARK get NaN logits."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config, self.fail = model.config, "logits"

    device = property(lambda self: self.inner.device)
    dtype = property(lambda self: self.inner.dtype)

    def forward(self, ids, positions, backend, logits_index=None):
        out = self.inner(ids, positions, backend, logits_index=logits_index)
        marked = (ids[:, 0] == MARK) & (positions[:, 0] == 0)
        if self.fail == "raise" and bool(marked.any()):
            raise RuntimeError("kernel failed")
        return torch.where(marked[:, None, None], torch.full_like(out, float("nan")), out)


def run(model, prompts, params, pages=None):
    engine = Engine(model, PagedConfig(page_size=4, max_seqs=4, num_pages=pages))
    ids = [engine.add_request(p, params)[0] for p in prompts]
    engine.run()
    return engine, [engine.outputs[i] for i in ids]


@pytest.fixture
def lm(tiny_factory):
    folder, _ = tiny_factory(arch="llama", extra_config=EVICTING)
    return dr.load(folder)


def good_prompts():
    return [[int(t) for t in torch.randint(8, 131, (n,))] for n in (5, 11, 2)]


def test_non_finite_logits_end_one_request_only(lm):
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    good = good_prompts()
    _, alone = run(lm.model, good, params)
    engine, outs = run(NaNForMarked(lm.model), good[:1] + [[MARK, 3, 4, 5]] + good[1:], params)
    bad = outs[1]
    assert bad.finish_reason == "error" and isinstance(bad.error, FloatingPointError)
    assert "non-finite" in str(bad.error)
    assert [o.token_ids for o in outs[:1] + outs[2:]] == [o.token_ids for o in alone]
    assert engine.cache.pages_in_use == 0
    engine.cache.check_invariants()


def test_a_raising_forward_ends_its_batch_and_the_engine_goes_on(lm):
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    model = NaNForMarked(lm.model)
    model.fail = "raise"
    engine = Engine(model, PagedConfig(page_size=4, max_seqs=4))
    bad = engine.add_request([MARK, 1, 2], params)[0]
    engine.run()
    assert engine.outputs[bad].finish_reason == "error" and "kernel failed" in str(engine.outputs[bad].error)
    assert engine.cache.pages_in_use == 0
    good = good_prompts()[0]
    rid = engine.add_request(good, params)[0]
    engine.run()
    assert engine.outputs[rid].token_ids == dr.generate(lm, [good], params).token_ids[0]


def test_a_failing_sampler_ends_its_request(lm, monkeypatch):
    from dms_runtime.sampling import Sampler

    draw = Sampler.draw

    def flaky(p, logits, generator):
        if p.top_k == 5:
            raise RuntimeError("sampler failed")
        return draw(p, logits, generator)

    monkeypatch.setattr(Sampler, "draw", staticmethod(flaky))
    engine = Engine(lm.model, PagedConfig(page_size=4, max_seqs=4))
    ok = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=3))[0]
    bad = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=3, temperature=1.0, top_k=5, seed=0))[0]
    engine.run()
    assert engine.outputs[bad].finish_reason == "error" and "sampler failed" in str(engine.outputs[bad].error)
    assert engine.outputs[ok].finish_reason == "length"
    assert engine.cache.pages_in_use == 0


@pytest.mark.parametrize("when", ["waiting", "running", "fork"])
def test_abort_frees_pages_and_the_others_finish(lm, when):
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    good = good_prompts()
    _, alone = run(lm.model, good, params)
    engine = Engine(lm.model, PagedConfig(page_size=4, max_seqs=2 if when == "waiting" else 4))
    ids = [engine.add_request(p, params)[0] for p in good]
    victim = engine.add_request([9, 10, 11, 12, 13], params, n=3 if when == "fork" else 1)
    target = victim[1] if when == "fork" else victim[0]
    if when != "waiting":
        while engine.requests[target].status == "waiting" and when == "running":
            engine.step()
        engine.step()
    assert engine.abort(target)
    assert not engine.abort(target) and not engine.abort(10_000)
    engine.run()
    assert engine.outputs[target].finish_reason == "abort"
    assert [engine.outputs[i].token_ids for i in ids] == [o.token_ids for o in alone]
    if when == "fork":  # the other samples of the aborted one still finish
        assert all(engine.outputs[i].finish_reason == "length" for i in victim if i != target)
    assert engine.cache.pages_in_use == 0
    engine.cache.check_invariants()


class FailsOnLongText:
    """A tokenizer whose decode fails once a request has ``limit`` tokens."""

    eos_token_id = None

    def __init__(self, limit):
        self.limit = limit

    def decode(self, ids, skip_special_tokens=True):
        if len(ids) >= self.limit:
            raise RuntimeError("cannot decode")
        return " ".join(map(str, ids))


def test_a_failing_decode_ends_its_request_only(lm):
    engine = Engine(lm.model, PagedConfig(page_size=4, max_seqs=4), tokenizer=FailsOnLongText(4))
    short = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=2, ignore_eos=True))[0]
    long = engine.add_request([4, 5, 6], SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
    engine.run()
    assert engine.outputs[short].finish_reason == "length" and engine.outputs[short].text
    assert engine.outputs[long].finish_reason == "error" and "cannot decode" in str(engine.outputs[long].error)
    assert engine.cache.pages_in_use == 0
    engine.cache.check_invariants()
