"""The CUDA paged kernels on a Hopper GPU: decode against a float64 softmax over each list's held
tokens (ragged lengths with 0 and 1 tokens, page boundaries, several splits, GQA 1/4/8, head dims
64/128, fp16/bf16), empty rows without a new key give zeros, the store kernel moves exactly what
the Triton one moves, and both run inside the paged cache and the runtime.

Everything here needs a GPU; the host side (plan, partition, argument checks) is tested on CPU
in test_cuda_plan.py and the build in test_cuda_static.py."""

import math

import pytest
import torch
from paged_lists import dense_lists, random_cache, reference_decode

from dms_kernels import cuda as dcuda

if not (torch.cuda.is_available() and dcuda.available()):
    pytestmark = pytest.mark.skip(reason="no CUDA device")
elif not dcuda.hopper(torch.device("cuda")):
    pytestmark = pytest.mark.skip(reason="no Hopper GPU (the kernels are built for sm_90a)")

TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


def build_cache(b, h, d, ps, w, starts, kept, dtype, seed=0):
    """A pool on the GPU with each list's ring and kept pages scattered over shuffled pages."""
    return random_cache(b, h, d, ps, w, torch.clamp(starts, max=w), kept, dtype, device="cuda", seed=seed)


def expected_decode(q, k_new, v_new, k_pool, v_pool, table, starts, kept, w, R):
    """dms_kernels.reference over each list's held tokens (ring slots, then kept) and its new key."""
    return reference_decode(q, k_new, v_new, *dense_lists(k_pool, v_pool, table, torch.clamp(starts, max=w), kept, R))


W, PS = 37, 16  # a ring that is not a whole number of pages
STARTS = [0, 1, W - 1, W, W + 1, W + 16, 3 * W, 5000]
KEPT = [[0, 0], [0, 0], [0, 0], [0, 0], [1, 0], [15, 16], [17, 40], [4900, 3000]]  # <= start - w


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("g", [1, 4, 8])
def test_decode_matches_reference(dtype, d, g):
    h = 2
    starts = torch.tensor(STARTS)
    kept = torch.tensor(KEPT)
    b = len(STARTS)
    k_pool, v_pool, table, R = build_cache(b, h, d, PS, W, starts, kept, dtype, seed=d + g)
    q = torch.randn(b, h * g, d, device="cuda", dtype=dtype)
    k_new = torch.randn(b, h, d, device="cuda", dtype=dtype)
    v_new = torch.randn(b, h, d, device="cuda", dtype=dtype)
    got = dcuda.paged_decode_attention(q, k_new, v_new, k_pool, v_pool, table, starts.cuda(), kept.cuda(), W, R)
    exp = expected_decode(q, k_new, v_new, k_pool, v_pool, table, starts, kept, W, R)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double().cpu(), exp, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_without_new_key_gives_zeros_for_empty_lists(dtype):
    d, h, g = 128, 2, 4
    starts = torch.tensor([0, 0, 1, 300])
    kept = torch.tensor([[0, 0], [0, 0], [0, 0], [0, 263]])
    k_pool, v_pool, table, R = build_cache(4, h, d, PS, W, starts, kept, dtype)
    q = torch.randn(4, h * g, d, device="cuda", dtype=dtype)
    got = dcuda.paged_decode_attention(q, None, None, k_pool, v_pool, table, starts.cuda(), kept.cuda(), W, R)
    assert torch.isfinite(got).all()
    assert torch.equal(got[:2], torch.zeros_like(got[:2]))  # nothing held, no new key: zeros, never NaN
    exp = expected_decode(q, None, None, k_pool, v_pool, table, starts, kept, W, R)
    torch.testing.assert_close(got.double().cpu(), exp, atol=TOL[dtype], rtol=TOL[dtype])


def test_decode_takes_k_and_v_in_different_layouts_and_checks_kept_len():
    d, h, g, dtype = 128, 2, 4, torch.bfloat16
    starts, kept = torch.tensor([0, 90, 300]), torch.tensor([[0, 0], [20, 53], [0, 263]])
    k_pool, v_pool, table, R = build_cache(3, h, d, PS, W, starts, kept, dtype)
    q = torch.randn(3, h * g, d, device="cuda", dtype=dtype)
    k_new = torch.randn(3, h, d, device="cuda", dtype=dtype)
    v_new = torch.randn(h, 3, d, device="cuda", dtype=dtype).transpose(0, 1)  # strides differ from k_new's
    got = dcuda.paged_decode_attention(q, k_new, v_new, k_pool, v_pool, table, starts.cuda(), kept.cuda(), W, R)
    exp = expected_decode(q, k_new, v_new, k_pool, v_pool, table, starts, kept, W, R)
    torch.testing.assert_close(got.double().cpu(), exp, atol=TOL[dtype], rtol=TOL[dtype])
    too_many = kept.clone()
    too_many[2, 1] = (table.shape[2] - R) * PS + 1  # past the last column of the list's row
    with pytest.raises(ValueError, match="starts/kept_len: expected >= 0 and kept_len <="):
        dcuda.paged_decode_attention(q, k_new, v_new, k_pool, v_pool, table, starts.cuda(), too_many.cuda(), W, R)


def test_decode_plan_made_for_fewer_tokens_still_reads_everything():
    d, h, g, dtype = 64, 1, 4, torch.bfloat16
    starts, kept = torch.tensor([4000]), torch.tensor([[3000]])
    k_pool, v_pool, table, R = build_cache(1, h, d, PS, W, starts, kept, dtype)
    q = torch.randn(1, g, d, device="cuda", dtype=dtype)
    kn, vn = torch.randn(2, 1, h, d, device="cuda", dtype=dtype)
    args = (q, kn, vn, k_pool, v_pool, table, starts.cuda(), kept.cuda(), W, R)
    small = dcuda.decode_plan(h, g, d, dtype, 100, dcuda.num_sms(0))
    torch.testing.assert_close(dcuda.paged_decode_attention(*args, plan=small), dcuda.paged_decode_attention(*args),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype,d,v_view", [(torch.float16, 64, False), (torch.bfloat16, 128, False),
                                            (torch.float32, 64, False), (torch.bfloat16, 128, True)])
@pytest.mark.parametrize("t", [1, 5, 70])
def test_store_moves_what_the_triton_store_moves(dtype, d, v_view, t):
    """v_view: v as the runtime makes it (a transposed view of v_proj's [B, T, H * D] output) while
    k is a fresh contiguous tensor, so the two differ in strides."""
    from dms_kernels.triton.store_op import paged_store as triton_store

    torch.manual_seed(t + d)
    b, h, ps, w = 4, 2, 16, 37
    R, K = math.ceil(w / ps), 16
    nl = 3 * b * h
    n_pages = nl * (R + K)
    page_table = torch.randperm(n_pages, device="cuda").view(nl, R + K)  # every column allocated
    k_pool = torch.randn(n_pages, ps, d, device="cuda", dtype=dtype)
    v_pool = torch.randn_like(k_pool)
    ring_evict = torch.rand(nl, w, device="cuda") < 0.5
    lists = torch.randperm(nl, device="cuda")[: b * h].view(b, h)
    starts = torch.tensor([0, 1, w - 2, 90], device="cuda")
    n_new = torch.tensor([t, 1, t, max(1, t - 3)], device="cuda")
    kept0 = torch.minimum(torch.randint(0, 40, (b, h), device="cuda"), torch.clamp(starts - w, min=0)[:, None])
    k_new = torch.randn(b, h, t, d, device="cuda", dtype=dtype)
    v_new = torch.randn_like(k_new)
    if v_view:
        v_new = torch.randn(b, t, h * d, device="cuda", dtype=dtype).view(b, t, h, d).transpose(1, 2)
    new_evict = torch.rand(b, h, t, device="cuda") < 0.5
    ours = (k_pool.clone(), v_pool.clone(), ring_evict.clone())
    theirs = (k_pool.clone(), v_pool.clone(), ring_evict.clone())
    dcuda.paged_store(k_new, v_new, new_evict, ours[0], ours[1], page_table, ours[2], lists, kept0, starts, n_new, w, R)
    triton_store(k_new, v_new, new_evict, theirs[0], theirs[1], page_table, theirs[2], lists, kept0, starts, n_new,
                 w, R)
    for a, e in zip(ours, theirs):
        assert torch.equal(a, e)


@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 128), (torch.float16, 64)])
def test_cuda_ops_inside_the_paged_cache_match_torch_attention(dtype, d):
    """Prefill chunks and decode steps through PagedStep: the CUDA ops against the torch
    attention on the same cache, and a twin cache stored by torch indexing holds the same bytes."""
    from dms_kernels.ops import paged_attention_op
    from dms_runtime.config import DMSConfig, ModelConfig
    from dms_runtime.paged import PagedConfig, PagedKVCache
    from dms_runtime.paged.torch_kernels import torch_paged_attention
    from dms_runtime.paged.backends import OpKernels, TorchKernels
    from dms_runtime.paged.plan import StepPlan
    from dms_runtime.paged.step import PagedStep

    class Checked(OpKernels):
        def attend(self, cache, plan, layer, q, k, v, new_evict, ring_evict):
            args = (q, k, v, new_evict, plan.n_new, plan.starts, cache.k_pool, cache.v_pool, plan.tables[layer],
                    plan.kept0[layer], ring_evict, cache.w, cache.R)
            return checked(*args, max_tokens=plan.max_tokens)

    L, HQ, H, w = 2, 8, 2, 20
    cfg = ModelConfig(arch="llama", vocab_size=8, hidden_size=16, intermediate_size=8, num_layers=L, num_heads=HQ,
                      num_kv_heads=H, head_dim=d, rms_norm_eps=1e-6, max_position_embeddings=512, rope_theta=1e4,
                      rope_scaling=None, attention_bias=False, o_bias=False, mlp_bias=False, qk_norm=False,
                      tie_word_embeddings=False, dms=DMSConfig(window_size=w))
    pcfg = PagedConfig(page_size=16, max_seqs=3, num_pages=600)
    ours, twin = (PagedKVCache(cfg, pcfg, dtype, "cuda", 512) for _ in range(2))

    def checked(*args, max_tokens=-1):
        got = paged_attention_op(*args, max_tokens=max_tokens, impl="cuda")
        exp = torch_paged_attention(*args)
        n_new = args[4].tolist()
        for i, n in enumerate(n_new):  # right padding past n_new is undefined
            torch.testing.assert_close(got[i, :, :n], exp[i, :, :n], atol=TOL[dtype], rtol=TOL[dtype])
        return got

    torch.manual_seed(0)
    lengths = torch.zeros(3, dtype=torch.int64)
    for chunk in [(13, 1, 40)] + [(1, 1, 1)] * 30 + [(7, 1, 1)] + [(1, 1, 1)] * 10:
        t = max(chunk)
        plan = StepPlan.build(ours, [0, 1, 2], lengths.tolist(), list(chunk))
        plan_twin = StepPlan.build(twin, [0, 1, 2], lengths.tolist(), list(chunk))
        step = PagedStep(ours, plan, Checked("cuda"))
        step_twin = PagedStep(twin, plan_twin, TorchKernels())
        for layer in range(L):
            q = torch.randn(3, HQ, t, d, device="cuda", dtype=dtype)
            k, v = torch.randn(2, 3, H, t, d, device="cuda", dtype=dtype)
            logits = torch.where(torch.rand(3, H, t, device="cuda") < 0.7, 1.0, -1.0)
            step.attend(layer, q, k, v, logits)
            step_twin.attend(layer, q, k, v, logits)
        ours.finish_step(plan)
        twin.finish_step(plan_twin)
        lengths += torch.tensor(chunk)
        assert torch.equal(ours.page_table, twin.page_table) and torch.equal(ours.kept_len, twin.kept_len)
        assert torch.equal(ours.ring_evict, twin.ring_evict)
        held = ours.page_table >= 0
        for pool, other in ((ours.k_pool, twin.k_pool), (ours.v_pool, twin.v_pool)):
            pages = ours.page_table[held].unique()
            assert torch.equal(pool[pages], other[pages])


def test_auto_picks_cuda_and_triton_stays_forcible(tiny_factory):
    import dms_runtime as dr
    from dms_runtime.paged.backends import resolve

    assert resolve("auto", torch.device("cuda")).name == "cuda"
    assert resolve("triton", torch.device("cuda")).name == "triton"
    folder, _ = tiny_factory(arch="qwen3", hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                             head_dim=64, extra_config={"dms_window_size": 8, "dms_initial_alpha_offset": 0.0})
    lm = dr.load(folder, dtype="bfloat16", device="cuda")
    ps = [torch.randint(0, 131, (n,)).tolist() for n in (9, 30, 3)]
    got = dr.generate(lm, ps, max_new_tokens=12, ignore_eos=True, paged=dr.PagedConfig(page_size=16, max_seqs=3))
    tri = dr.generate(lm, ps, max_new_tokens=12, ignore_eos=True,
                      paged=dr.PagedConfig(attention="triton", page_size=16, max_seqs=3))
    assert got.stats.backend == "paged/cuda" and tri.stats.backend == "paged/triton"
    assert got.stats.kernels == {"projection": "triton", "prefill": "triton", "decode": "cuda", "store": "cuda"}
    assert set(tri.stats.kernels.values()) == {"triton"}
    assert [len(t) for t in got.token_ids] == [12, 12, 12]
    # bf16 on a random tiny model: most greedy tokens agree with the Triton path
    same = sum(a == b for x, y in zip(got.token_ids, tri.token_ids) for a, b in zip(x, y))
    assert same >= 0.8 * 36
