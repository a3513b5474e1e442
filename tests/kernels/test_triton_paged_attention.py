"""The Triton paged attention (chunk kernel + split-K decode kernel) inside the paged cache, under
random traffic, against dms_kernels.reference over each sequence's full history; and the paged
runtime end to end through it (same tokens as the oracle runtime)."""

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dms_runtime as dr

sys.path.insert(0, str(Path(__file__).parents[1] / "runtime"))
from test_pool_hypothesis import Harness, random_traffic  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1 (set by the test run)")


def triton_attention(*args, **kwargs):
    from dms_kernels.triton.attention_op import triton_paged_attention

    return triton_paged_attention(*args, **kwargs)


def triton_store(*args):
    from dms_kernels.triton.store_op import paged_store

    return paged_store(*args)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), window=st.integers(1, 6), page_size=st.sampled_from([1, 3, 4]),
       evict_p=st.sampled_from([0.0, 0.6, 1.0]))
def test_triton_attention_under_random_traffic(data, window, page_size, evict_p):
    hx = Harness(window, page_size, num_pages=400, max_seqs=3, attention=triton_attention, store=triton_store, d=16,
                 dtype=torch.float32, tol=2e-4)
    random_traffic(data, hx, evict_p, max_steps=8)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 3e-2)])
def test_triton_attention_half_precision(dtype, tol):
    hx = Harness(3, 4, num_pages=200, max_seqs=2, attention=triton_attention, store=triton_store, d=16, dtype=dtype, tol=tol)
    for slot in (0, 1):
        hx.seqs[slot] = hx.new_history()
    hx.free_slots = []
    hx.step({0: 9, 1: 1}, 0.7)  # chunk longer than the window; a single token
    hx.step({0: 1, 1: 6}, 0.7)
    hx.step({0: 1, 1: 1}, 0.7)  # decode
    hx.step({0: 4, 1: 1}, 0.7)


@pytest.mark.parametrize("arch,variant", [("llama", "borrowed"), ("qwen3", "adapter"), ("qwen3", "vanilla")])
def test_paged_runtime_through_triton_gives_reference_tokens(tiny_factory, arch, variant):
    """The whole layer path on the kernels: fused projection epilogue, chunk/decode attention, store."""
    extra = {"dms_window_size": 4, "dms_initial_alpha_offset": 0.0}
    if variant == "adapter":
        extra["dms_separate_alpha"] = True
    folder, _ = tiny_factory(arch=arch, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             **({"head_dim": 16} if arch == "qwen3" else {}),
                             extra_config=None if variant == "vanilla" else extra)
    lm = dr.load(folder)
    assert lm.config.head_dim == 16
    if variant == "adapter":
        with torch.no_grad():
            for layer in lm.model.model.layers:
                layer.self_attn.dms_proj_alpha.weight.normal_(0, 0.05)
    ps = [torch.randint(0, 131, (n,)).tolist() for n in (9, 17, 3)]
    ref = dr.generate(lm, ps, max_new_tokens=10, ignore_eos=True, backend="oracle")
    got = dr.generate(lm, ps, max_new_tokens=10, ignore_eos=True,
                      paged=dr.PagedConfig(attention="triton", page_size=4, prefill_chunk=6, max_seqs=3))
    assert got.stats.backend == "paged/triton"
    assert got.token_ids == ref.token_ids
    assert [o.live_tokens for o in got.outputs] == [o.live_tokens for o in ref.outputs]
    assert (ref.stats.kv.compression_ratio > 1.1) == (variant != "vanilla")


def test_fully_evicted_key_blocks_inside_the_window_are_not_skipped():
    # a 40-token chunk where every key but the last is evicted: blocks of evicted keys are still
    # seen by the queries within w of them
    hx = Harness(4, 4, num_pages=200, max_seqs=1, attention=triton_attention, store=triton_store, d=16, dtype=torch.float32, tol=2e-4)
    hx.seqs[0] = hx.new_history()
    hx.free_slots = []
    hx.step({0: 40}, 1.0)
    hx.step({0: 40}, 1.0)


def test_custom_op_has_a_fake_implementation_and_validates():
    import dms_kernels.ops  # noqa: F401  (registers torch.ops.dms.*)
    from torch._subclasses.fake_tensor import FakeTensorMode

    b, hq, h, t, d, w, ps = 2, 4, 2, 3, 16, 4, 4
    with FakeTensorMode():
        args = (torch.empty(b, hq, t, d), torch.empty(b, h, t, d), torch.empty(b, h, t, d),
                torch.empty(b, h, t, dtype=torch.bool), torch.empty(b, dtype=torch.int64),
                torch.empty(b, dtype=torch.int64), torch.empty(10, ps, d), torch.empty(10, ps, d),
                torch.empty(b, h, 5, dtype=torch.int64), torch.empty(b, h, dtype=torch.int64),
                torch.empty(b, h, w, dtype=torch.bool))
        out = torch.ops.dms.paged_attention(*args, w, 1, None)
        assert out.shape == (b, hq, t, d)
    torch.library.opcheck(torch.ops.dms.paged_attention.default, (
        torch.randn(b, hq, t, d), torch.randn(b, h, t, d), torch.randn(b, h, t, d),
        torch.zeros(b, h, t, dtype=torch.bool), torch.tensor([3, 1]), torch.tensor([0, 5]),
        torch.randn(10, ps, d), torch.randn(10, ps, d), torch.randint(0, 10, (b, h, 5)),
        torch.tensor([[0, 2], [1, 0]]), torch.zeros(b, h, w, dtype=torch.bool), w, 1, None),
        test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="new_evict: expected torch.bool"):
        torch.ops.dms.paged_attention(torch.randn(b, hq, t, d), torch.randn(b, h, t, d), torch.randn(b, h, t, d),
                                      torch.zeros(b, h, t), torch.tensor([3, 1]), torch.tensor([0, 5]),
                                      torch.randn(10, ps, d), torch.randn(10, ps, d),
                                      torch.randint(0, 10, (b, h, 5)), torch.tensor([[0, 2], [1, 0]]),
                                      torch.zeros(b, h, w, dtype=torch.bool), w, 1, None)


@pytest.mark.parametrize("hq,d", [(2, 64), (8, 64), (16, 128)])
def test_chunk_kernel_gqa_groups_and_head_dims(hq, d, monkeypatch):
    """GQA groups 1, 4 and 8 (two KV heads) and head dims 64 and 128 through chunks and decode."""
    import test_pool_hypothesis as hyp

    monkeypatch.setattr(hyp, "HQ", hq)
    hx = Harness(5, 4, num_pages=300, max_seqs=2, attention=triton_attention, store=triton_store, d=d,
                 dtype=torch.bfloat16, tol=3e-2)
    for slot in (0, 1):
        hx.seqs[slot] = hx.new_history()
    hx.free_slots = []
    hx.step({0: 11, 1: 3}, 0.6)
    hx.step({0: 1, 1: 7}, 0.6)
    hx.step({0: 1, 1: 1}, 0.6)
