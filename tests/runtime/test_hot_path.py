"""The decode hot path: one plan per step, no host sync inside the layer loop (the torch kernel
set's decode step compiles whole under torch.compile(fullgraph=True) and, on a GPU, is captured in
a CUDA graph), one kernel set resolved once, and stats that name what ran each op."""

import copy
import os
from types import SimpleNamespace

import pytest
import torch

import dms_runtime as dr
from dms_runtime.engine import Engine
from dms_runtime.paged import PagedConfig
from dms_runtime.paged.backends import OpKernels, TorchKernels, resolve
from dms_runtime.paged.plan import StepPlan
from dms_runtime.paged.step import PagedStep
from dms_runtime.sampling import SamplingParams

EVICTING = {"dms_window_size": 4, "dms_initial_alpha_offset": 0.0}


@pytest.fixture
def lm(tiny_factory):
    folder, _ = tiny_factory(arch="llama", seed=5, extra_config=EVICTING)
    return dr.load(folder)


def decoding_engine(model, device="cpu", attention="torch", defer_budget=0):
    """An engine whose three requests have prefilled and decoded a few tokens (some eviction)."""
    eng = Engine(model, PagedConfig(page_size=4, max_seqs=3, max_model_len=64, attention=attention,
                                    defer_budget=defer_budget))
    for n in (9, 17, 3):
        eng.add_request(torch.randint(0, 131, (n,)).tolist(), SamplingParams(max_new_tokens=30, ignore_eos=True))
    while eng.stats.decode_steps < 6:
        eng.step()
    return eng


def decode_inputs(eng):
    reqs = eng.scheduler.schedule().requests
    dev = eng.model.device
    ids = torch.tensor([[r.tokens[r.num_computed]] for r in reqs], device=dev)
    return reqs, ids


def forward_over_plan(model, cache, kernels, reqs, ids):
    plan = StepPlan.build(cache, [r.slot for r in reqs], [r.num_computed for r in reqs], [1] * len(reqs))
    step = PagedStep(cache, plan, kernels)
    positions = plan.starts[:, None]
    return plan, step, positions


@pytest.mark.parametrize("defer_budget", [0, 6])
@torch.no_grad()
def test_torch_decode_step_compiles_fullgraph_and_matches_eager(lm, defer_budget):
    eng = decoding_engine(lm.model, defer_budget=defer_budget)
    reqs, ids = decode_inputs(eng)
    twin = copy.deepcopy(eng.cache)
    kernels = TorchKernels()

    def decode(ids, positions, step):
        return lm.model(ids, positions, step)

    captured = []

    def recording(gm, example_inputs):  # what the captured graph calls, then run it as it is
        captured.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    plan_e, step_e, pos_e = forward_over_plan(lm.model, eng.cache, kernels, reqs, ids)
    eager = decode(ids, pos_e, step_e)
    torch._dynamo.reset()
    compiled = torch.compile(decode, fullgraph=True, dynamic=False, backend=recording)  # a graph break raises
    plan_c, step_c, pos_c = forward_over_plan(lm.model, twin, kernels, reqs, ids)
    got = compiled(ids, pos_c, step_c)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    # torch.compile can capture a device value read on the host (as item / a data-dependent size);
    # the decode step's graph holds none
    synced = [t for t in captured if t in ("item", "tolist") or any(
        x in t for x in ("_local_scalar_dense", "_assert_scalar", "nonzero", "sym_size"))]
    assert len(captured) > 100 and synced == []
    assert eng.cache.finish_step(plan_e) == twin.finish_step(plan_c) > 0
    for name in ("page_table", "kept_len", "ring_evict", "ring_mark", "seq_len", "page_ref"):
        assert torch.equal(getattr(eng.cache, name), getattr(twin, name)), name
    if defer_budget:
        assert torch.equal(eng.cache.marked_pos, twin.marked_pos)
    held = eng.cache.page_table[eng.cache.page_table >= 0].unique()
    assert torch.equal(eng.cache.k_pool[held], twin.k_pool[held])
    assert torch.equal(eng.cache.v_pool[held], twin.v_pool[held])


@pytest.mark.parametrize("defer_budget", [0, 6])
@torch.no_grad()
def test_the_layer_loop_never_reads_a_device_value(lm, monkeypatch, defer_budget):
    """Eager: every way of reading a tensor on the host raises while the model runs over the plan."""
    eng = decoding_engine(lm.model, defer_budget=defer_budget)
    reqs, ids = decode_inputs(eng)
    plan, step, positions = forward_over_plan(lm.model, eng.cache, TorchKernels(), reqs, ids)

    def refuse(*a, **k):
        raise AssertionError("host sync inside the layer loop")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__index__", "nonzero"):
            m.setattr(torch.Tensor, name, refuse)
        lm.model(ids, positions, step)
    eng.cache.finish_step(plan)
    eng.cache.check_invariants()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
@pytest.mark.parametrize("attention", ["torch", "triton"])
@torch.no_grad()
def test_decode_step_is_captured_in_a_cuda_graph(tiny_factory, attention):
    folder, _ = tiny_factory(arch="llama", seed=5, extra_config=EVICTING)
    model = dr.load(folder, device="cuda").model
    eng = decoding_engine(model, "cuda", attention)
    reqs, ids = decode_inputs(eng)
    kernels = eng.runner.kernels
    twin = copy.deepcopy(eng.cache)
    plan_e, step_e, pos_e = forward_over_plan(model, twin, kernels, reqs, ids)
    eager = model(ids, pos_e, step_e)
    plan, step, positions = forward_over_plan(model, eng.cache, kernels, reqs, ids)
    saved = {n: getattr(eng.cache, n).clone() for n in ("k_pool", "v_pool", "kept_len", "ring_evict")}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (Triton compiles, allocator settles), then restore the cache
        model(ids, positions, step)
    torch.cuda.current_stream().wait_stream(s)
    for n, t in saved.items():
        getattr(eng.cache, n).copy_(t)
    plan.tokens_read.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(ids, positions, step)
    for n, t in saved.items():
        getattr(eng.cache, n).copy_(t)
    plan.tokens_read.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, rtol=2e-3, atol=2e-3)
    assert eng.cache.finish_step(plan) == twin.finish_step(plan_e)
    assert torch.equal(eng.cache.kept_len, twin.kept_len) and torch.equal(eng.cache.ring_evict, twin.ring_evict)


def test_each_op_reports_the_torch_kernels_on_cpu(lm):
    got = dr.generate(lm, [[1, 2, 3, 4, 5, 6, 7]], max_new_tokens=4, ignore_eos=True,
                      paged=PagedConfig(attention="torch"))
    assert got.stats.kernels == {"projection": "torch", "prefill": "torch", "decode": "torch", "store": "torch"}
    assert got.stats.to_dict()["kernels"] == got.stats.kernels


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 (set by the test run)")
@pytest.mark.parametrize("alpha_per,projection", [("head", "triton"), ("layer", "torch")])
def test_each_op_reports_the_triton_kernels(tiny_factory, alpha_per, projection):
    folder, _ = tiny_factory(arch="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             extra_config={**EVICTING, "dms_alpha_per": alpha_per})
    lm = dr.load(folder)
    eng = Engine(lm.model, PagedConfig(attention="triton", page_size=4, max_seqs=1, max_model_len=32))
    eng.add_request([3, 1, 4, 1, 5], SamplingParams(max_new_tokens=3, ignore_eos=True))
    eng.step()
    assert eng.stats.kernels == {"projection": projection, "prefill": "triton", "store": "triton"}
    eng.run()
    assert eng.stats.kernels == {"projection": projection, "prefill": "triton", "decode": "triton", "store": "triton"}


def test_the_cuda_set_reports_where_the_hand_written_kernels_run(monkeypatch):
    """The cuda set runs decode (fp16/bf16, D 64/128, group <= 16) and the store on the CUDA
    kernels, prefill chunks and other shapes on Triton; ``ran`` says so, by the ops' own routing."""
    from dms_kernels import cuda as dcuda

    monkeypatch.setattr(dcuda, "unavailable_reason", lambda dev: None)
    cfg = SimpleNamespace(num_heads=8, num_kv_heads=2, head_dim=64, dms_active=True, dms=SimpleNamespace(alpha_per="head"))
    gpu = SimpleNamespace(device=torch.device("cuda"))
    kernels = OpKernels("cuda")
    decode = SimpleNamespace(starts=gpu, decode=True, t=1)
    prefill = SimpleNamespace(starts=gpu, decode=False, t=7)
    assert kernels.ran(cfg, decode, torch.bfloat16) == {"projection": "triton", "decode": "cuda", "store": "cuda"}
    assert kernels.ran(cfg, prefill, torch.bfloat16) == {"projection": "triton", "prefill": "triton", "store": "cuda"}
    assert kernels.ran(cfg, decode, torch.float32) == {"projection": "triton", "decode": "triton", "store": "cuda"}
    assert OpKernels("triton").ran(cfg, decode, torch.bfloat16)["decode"] == "triton"


def test_auto_is_resolved_once_at_engine_construction(lm, monkeypatch):
    import dms_runtime.engine.engine as engine_mod

    calls = []
    monkeypatch.setattr(engine_mod, "resolve", lambda name, dev: calls.append(name) or resolve(name, dev))
    eng = Engine(lm.model, PagedConfig(max_model_len=32))
    eng.add_request([1, 2, 3], SamplingParams(max_new_tokens=3, ignore_eos=True))
    eng.run()
    # on CPU "auto" is the C++ kernel set where dms_kernels._cpu is built, else torch
    from dms_kernels import cpu

    want = "torch" if cpu.unavailable_reason(torch.device("cpu")) else "cpu"
    assert calls == ["auto"] and eng.attention_name == want
    assert eng.stats.kernels["decode"] == want and isinstance(eng.runner.kernels, TorchKernels) == (want == "torch")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 (set by the test run)")
def test_sinks_hold_when_the_triton_projection_records_the_decision(tiny_factory):
    """The Triton projection records the previous key's decision from the raw logit; a sink's decision
    (a step starting at positions 1..n: here decode steps of one- and two-token prompts and a chunk
    boundary) is recorded again from the kept logit, so the kernels give the oracle's tokens."""
    folder, _ = tiny_factory(arch="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             extra_config={"dms_window_size": 2, "dms_initial_alpha_offset": -2.0,
                                           "dms_alpha_scale": 200.0, "dms_sink_tokens": 3})
    lm = dr.load(folder)
    ps = [[7], [3, 1], [2, 7, 1, 8, 2, 8, 1, 8]]
    ref = dr.generate(lm, ps, max_new_tokens=12, ignore_eos=True, backend="oracle")
    plain = dr.generate(dr.load(folder, dms={"dms_sink_tokens": 0}), ps, max_new_tokens=12, ignore_eos=True,
                        backend="oracle")
    assert [o.live_tokens for o in ref.outputs] != [o.live_tokens for o in plain.outputs]  # sinks matter here
    got = dr.generate(lm, ps, max_new_tokens=12, ignore_eos=True,
                      paged=PagedConfig(attention="triton", page_size=2, prefill_chunk=2, max_seqs=3))
    assert got.stats.kernels["projection"] == "triton"
    assert got.token_ids == ref.token_ids
    assert [o.live_tokens for o in got.outputs] == [o.live_tokens for o in ref.outputs]
