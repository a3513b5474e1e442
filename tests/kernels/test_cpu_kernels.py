"""The fused CPU kernels (``dms_kernels._cpu``): paged attention against dms_kernels.reference over
each list's full history (ragged lengths, 0 and 1 held tokens, window and page boundaries, kept
stores over several pages, GQA groups 1/3/4, head dims 64/128, decode and chunks, fp32/fp64 and
bf16/fp16 with tolerances), the store against the torch mover (exactly), bad input, the op and
backend dispatch, and the paged runtime end to end on the kernels."""

import math
import sys
from pathlib import Path

import pytest
import torch

import dms_kernels.ops as ops
import dms_runtime as dr
from dms_kernels import cpu
from dms_kernels import reference as ref

sys.path.insert(0, str(Path(__file__).parents[1] / "runtime"))
import test_pool_hypothesis as hyp  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu.built(), reason=f"the CPU kernels are not built: {cpu.unavailable_reason()}")

TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def paged_case(starts, n_new, t, window, ps, hq, h, d, dtype, evict_p, generator=None):
    """A paged cache built from random histories, as the cache's store leaves it: for each list,
    positions ``[max(0, S - w), S)`` in ring slot ``pos % w`` with their decisions, the kept ones
    older than that in the kept store; pages shuffled over a pool whose unheld slots are NaN.
    Returns the op's arguments and, per sequence, the full history for the reference."""
    g = generator
    b = len(starts)
    R = math.ceil(window / ps)
    hist = []  # per sequence: k, v [H, S, D], evict [H, S]
    kept = torch.zeros(b, h, dtype=torch.int64)
    for bi, s in enumerate(starts):
        k = torch.randn(h, s, d, generator=g, dtype=torch.float64).to(dtype)
        v = torch.randn(h, s, d, generator=g, dtype=torch.float64).to(dtype)
        ev = torch.rand(h, s, generator=g) < evict_p
        hist.append((k, v, ev))
        kept[bi] = (~ev[:, : max(0, s - window)]).sum(-1)
    kcols = max(1, math.ceil(int(kept.max()) / ps)) if b else 1
    tw = R + kcols + 1  # one spare column: the kernels must not read past kept_len
    n_pages = b * h * tw + 5
    perm = iter(torch.randperm(n_pages, generator=g).tolist())
    k_pool = torch.full((n_pages, ps, d), float("nan"), dtype=dtype)
    v_pool = torch.full((n_pages, ps, d), float("nan"), dtype=dtype)
    table = torch.full((b, h, tw), -1, dtype=torch.int64)
    ring_evict = torch.rand(b, h, window, generator=g) < 0.5  # unheld slots: noise
    for bi, s in enumerate(starts):
        k, v, ev = hist[bi]
        for hi in range(h):
            for c in range(math.ceil(min(s, window) / ps)):
                table[bi, hi, c] = next(perm)
            for c in range(math.ceil(int(kept[bi, hi]) / ps)):
                table[bi, hi, R + c] = next(perm)
            for p in range(max(0, s - window), s):
                slot = p % window
                page = table[bi, hi, slot // ps]
                k_pool[page, slot % ps], v_pool[page, slot % ps] = k[hi, p], v[hi, p]
                ring_evict[bi, hi, slot] = ev[hi, p]
            kept_pos = [p for p in range(max(0, s - window)) if not ev[hi, p]]
            for j, p in enumerate(kept_pos):
                page = table[bi, hi, R + j // ps]
                k_pool[page, j % ps], v_pool[page, j % ps] = k[hi, p], v[hi, p]
    q = torch.randn(b, hq, t, d, generator=g, dtype=torch.float64).to(dtype)
    k_new = torch.randn(b, h, t, d, generator=g, dtype=torch.float64).to(dtype)
    v_new = torch.randn(b, h, t, d, generator=g, dtype=torch.float64).to(dtype)
    new_evict = torch.rand(b, h, t, generator=g) < evict_p
    args = (q, k_new, v_new, new_evict, torch.tensor(n_new, dtype=torch.int64),
            torch.tensor(starts, dtype=torch.int64), k_pool, v_pool, table, kept, ring_evict, window, R)
    return args, hist


def expected(args, hist):
    """dms_kernels.reference over each sequence's full history plus its new chunk, in float64;
    rows past n_new are zeros."""
    q, k_new, v_new, new_evict, n_new, starts, *_, window, _r = args
    out = torch.zeros(q.shape, dtype=torch.float64)
    for bi, (k, v, ev) in enumerate(hist):
        s, n = int(starts[bi]), int(n_new[bi])
        if n == 0:
            continue
        kk = torch.cat([k, k_new[bi, :, :n]], 1).double()[None]
        vv = torch.cat([v, v_new[bi, :, :n]], 1).double()[None]
        dec = torch.cat([ev, new_evict[bi, :, :n]], 1)[None]
        out[bi, :, :n] = ref.dms_attention_cached(q[bi : bi + 1, :, :n].double(), kk, vv, dec, window,
                                                  (s + torch.arange(n))[None], torch.tensor([s + n]))[0]
    return out


def check(args, hist, dtype):
    got = cpu.paged_attention(*args)
    assert got.dtype == dtype and got.shape == args[0].shape
    exp = expected(args, hist)
    assert torch.isfinite(got).all(), "stale (NaN) pool data reached the output"
    torch.testing.assert_close(got.double(), exp, rtol=TOL[dtype], atol=TOL[dtype])
    # the same call through the op and its dispatch
    torch.testing.assert_close(torch.ops.dms.paged_attention(*args, None, impl="cpu"), got, rtol=0, atol=0)
    return got


@pytest.mark.parametrize("hq,h,d", [(2, 2, 64), (6, 2, 64), (8, 2, 128), (3, 1, 128), (4, 2, 40)])
@pytest.mark.parametrize("window,ps", [(1, 1), (4, 3), (5, 4), (16, 16)])
def test_decode_over_window_and_page_boundaries(hq, h, d, window, ps):
    """Decode (T = 1): starts below, at and above the window; 0 and 1 held tokens; kept stores
    over several pages; every decision rate."""
    w = window
    starts = sorted({0, 1, max(0, w - 1), w, w + 1, 2 * w + 3, 5 * w + ps + 7})
    for evict_p in (0.0, 0.5, 1.0):
        args, hist = paged_case(starts, [1] * len(starts), 1, w, ps, hq, h, d, torch.float32, evict_p)
        check(args, hist, torch.float32)


@pytest.mark.parametrize("hq,h,d", [(2, 2, 64), (6, 2, 64), (8, 2, 128)])
@pytest.mark.parametrize("window,ps", [(1, 1), (3, 4), (6, 4), (16, 16)])
def test_chunks_ragged_causal_with_new_decisions(hq, h, d, window, ps):
    """Prefill chunks (T > 1): ragged n_new (incl. 0 and 1, right padding), the chunk's own
    decisions applied causally within the chunk, chunks longer than the window."""
    w = window
    starts = [0, w - 1 if w > 1 else 0, w, w + 2, 3 * w + 5]
    n_new = [19, 1, 0, 7, 19]
    for evict_p in (0.0, 0.6, 1.0):
        args, hist = paged_case(starts, n_new, 19, w, ps, hq, h, d, torch.float32, evict_p)
        got = check(args, hist, torch.float32)
        assert (got[2] == 0).all() and (got[1, :, 1:] == 0).all()  # padding rows are zeros


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("t", [1, 9])
def test_dtypes(dtype, t):
    if dtype not in cpu.dtypes():
        pytest.skip(f"{dtype} not supported by this build")
    args, hist = paged_case([0, 5, 13, 40], [t, t, max(1, t - 3), t], t, 6, 4, 8, 2, 64, dtype, 0.5)
    check(args, hist, dtype)


def test_splits_of_long_lists_merge_and_a_split_that_sees_nothing_weighs_zero():
    """With many threads a long list is split over its held keys and merged by log-sum-exp. In a
    chunk whose ring is all evicted, the late queries see no key of the first split (its LSE is
    -inf): it must weigh nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        args, hist = paged_case([5000, 3100], [1, 1], 1, 64, 16, 4, 1, 64, torch.float32, 0.3)  # decode
        check(args, hist, torch.float32)
        args, hist = paged_case([600], [400], 400, 600, 16, 1, 1, 64, torch.float32, 1.0)  # chunk
        check(args, hist, torch.float32)
    finally:
        torch.set_num_threads(threads)


def test_kernel_reads_through_strided_views():
    """q/k/v as transposed views (as the model passes them) and gathered table rows."""
    args, hist = paged_case([3, 11], [4, 2], 4, 4, 4, 4, 2, 64, torch.float32, 0.5)
    q, k, v = args[:3]
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    vt = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    table = args[8]
    wide = torch.cat([table, table], 2)[:, :, : table.shape[2]]
    assert not wide.is_contiguous()
    got = cpu.paged_attention(qt, kt, vt, *args[3:8], wide, *args[9:])
    torch.testing.assert_close(got, cpu.paged_attention(*args), rtol=0, atol=0)


# ----------------------------------------------------------------------------- in the paged cache


def cpu_attention(*args):
    return torch.ops.dms.paged_attention(*args, None, impl="cpu")


def cpu_store(*args):
    return torch.ops.dms.paged_store(*args, "cpu")


@pytest.mark.parametrize("hq,d,dtype,tol", [(2, 64, torch.float64, 1e-9), (6, 64, torch.float32, 2e-5),
                                            (8, 128, torch.float32, 2e-5), (8, 64, torch.bfloat16, 3e-2)])
def test_attention_and_store_inside_the_cache_against_the_reference(hq, d, dtype, tol, monkeypatch):
    """PagedKVCache driven by the CPU store and attention: every step equals the reference over
    each sequence's full history, and every list holds exactly the reference's live tokens."""
    monkeypatch.setattr(hyp, "HQ", hq)
    for window, ps in ((3, 4), (5, 2)):
        hx = hyp.Harness(window, ps, num_pages=400, max_seqs=3, attention=cpu_attention, store=cpu_store, d=d,
                         dtype=dtype, tol=tol)
        for slot in (0, 1, 2):
            hx.seqs[slot] = hx.new_history()
        hx.free_slots = []
        hx.step({0: 11, 1: 1, 2: 4}, 0.6)  # chunk longer than the window; a single token
        hx.step({0: 1, 1: 6, 2: 1}, 0.6)
        for _ in range(3):
            hx.step({0: 1, 1: 1, 2: 1}, 0.6)  # decode
        hx.step({0: 4, 2: 9}, 1.0)
        hx.step({0: 1, 1: 1, 2: 1}, 0.0)


def test_store_moves_exactly_what_the_torch_mover_moves():
    """Two caches fed the same steps, one moved by torch indexing, one by the CPU store: pools,
    decisions, kept lengths and page tables are identical after every step."""
    caches = [hyp.Harness(4, 3, num_pages=300, max_seqs=3, d=16, dtype=torch.float32).cache for _ in range(2)]
    caches[0].k_pool.normal_()  # stale data everywhere the steps do not write
    caches[0].v_pool.normal_()
    caches[1].k_pool.copy_(caches[0].k_pool)
    caches[1].v_pool.copy_(caches[0].v_pool)
    steps = [({0: 9, 1: 1, 2: 4}, 0.5), ({0: 1, 1: 6, 2: 1}, 0.5), ({0: 1, 1: 1, 2: 1}, 0.7),
             ({0: 5, 2: 13}, 0.5), ({0: 1, 1: 1, 2: 1}, 0.0), ({1: 3}, 1.0), ({0: 1, 1: 1, 2: 1}, 0.5)]
    from dms_runtime.paged.backends import OpKernels, TorchKernels
    from dms_runtime.paged.plan import StepPlan

    kernel_sets = (TorchKernels(), OpKernels("cpu"))
    for chunks, evict_p in steps:
        slots = sorted(chunks)
        b, t = len(slots), max(chunks.values())
        starts = [int(caches[0].seq_len[s]) for s in slots]
        n_new = [chunks[s] for s in slots]
        plans = [StepPlan.build(c, slots, starts, n_new) for c in caches]
        for layer in range(hyp.L):
            k, v = torch.randn(b, hyp.H, t, 16), torch.randn(b, hyp.H, t, 16)
            ev = torch.rand(b, hyp.H, t) < evict_p
            for c, plan, kernels in zip(caches, plans, kernel_sets):
                lists = plan.lists[layer]
                keep = c.leaving_kept(plan, lists, ev)
                kernels.store(c, plan, layer, lists, k, v, ev, keep)
                c.kept_len[lists] = plan.kept0[layer] + keep.sum(-1)
        for c, plan in zip(caches, plans):
            c.finish_step(plan)
        a, o = caches
        # the torch mover sends masked writes to the spare page P and the spare decision row NL
        assert torch.equal(a.k_pool[:a.P], o.k_pool[:o.P]) and torch.equal(a.v_pool[:a.P], o.v_pool[:o.P])
        assert torch.equal(a.ring_evict[:a.NL], o.ring_evict[:o.NL])
        for name in ("kept_len", "page_table", "seq_len"):
            assert torch.equal(getattr(a, name), getattr(o, name)), name
    assert int(caches[0].kept_len.sum()) > 0


# ----------------------------------------------------------------------------- bad input


def test_bad_attention_input_names_the_argument():
    args, _ = paged_case([3, 7], [2, 2], 2, 4, 4, 4, 2, 64, torch.float32, 0.5)
    a = list(args)

    def call(i, x, match):
        b = list(a)
        b[i] = x
        with pytest.raises(ValueError, match=match):
            cpu.paged_attention(*b)

    call(0, a[0][:, :3], "k_new: expected .* Hq=3 a multiple of H")
    call(0, a[0].to(torch.int32), "q: expected one of")
    call(1, a[1].double(), "k_new: expected a CPU torch.float32 tensor")
    call(3, a[3].float(), "new_evict: expected torch.bool")
    call(4, a[4].to(torch.int32), "n_new: expected torch.int64")
    call(4, torch.tensor([3, 1]), r"n_new: expected values in \[0, 2\]")
    call(5, torch.tensor([-1, 0]), "starts: expected values >= 0")
    call(6, a[6][:, :, :32], r"k_pool: expected a contiguous \[P, PS, 64\]")
    call(6, a[6].transpose(0, 1).contiguous().transpose(0, 1), "k_pool: expected a contiguous")
    call(8, a[8].int(), "table: expected int64")
    bad_table = a[8].clone()
    bad_table[1, 0, 0] = a[6].shape[0]
    call(8, bad_table, "table: page id .* outside the pool")
    call(9, torch.full((2, 2), 1000), r"kept_len: expected values in \[0, ")
    call(10, a[10][..., :3], "ring_evict: expected torch.bool of shape")
    call(11, 0, "window: expected an int >= 1")
    call(12, 0, "ring_pages: expected an int >= ceil")
    with pytest.raises(ValueError, match="new_evict: expected torch.bool"):
        b = list(a)
        b[3] = b[3].float()
        torch.ops.dms.paged_attention(*b, None, impl="cpu")


def test_bad_store_input_names_the_argument():
    cache = hyp.Harness(4, 4, num_pages=50, max_seqs=2, d=16, dtype=torch.float32).cache
    lists = cache.lists(0, torch.tensor([0, 1]))
    k = torch.randn(2, hyp.H, 3, 16)
    ev = torch.zeros(2, hyp.H, 3, dtype=torch.bool)
    base = [k, k.clone(), ev, cache.k_pool, cache.v_pool, cache.page_table, cache.ring_evict, lists,
            torch.zeros_like(lists), torch.tensor([0, 0]), torch.tensor([3, 3]), cache.w, cache.R]

    def call(i, x, match):
        b = list(base)
        b[i] = x
        with pytest.raises(ValueError, match=match):
            cpu.paged_store(*b)

    with pytest.raises(ValueError, match="page_table: list .* has no valid page"):  # pages not allocated
        cpu.paged_store(*base)
    call(3, cache.k_pool.double(), r"k_pool: expected a contiguous \[P, PS, 16\] torch.float32 pool")
    call(2, ev.int(), "new_evict: expected torch.bool")
    call(7, torch.tensor([[0, 1], [0, 1]]), "lists: list id 0 appears twice")
    call(7, lists + cache.NL, "lists: expected list ids in")
    call(9, torch.tensor([-2, 0]), "starts: expected values >= 0")
    call(10, torch.tensor([4, 0]), r"n_new: expected values in \[0, 3\]")
    call(6, cache.ring_evict[:, :2], "ring_evict: expected torch.bool of shape")


# ----------------------------------------------------------------------------- dispatch


def test_auto_on_cpu_runs_the_cpu_kernels_and_triton_stays_forceable():
    cpu_dev = torch.device("cpu")
    assert ops.kernels_for("auto", cpu_dev) == ops.kernels_for("cpu", cpu_dev) == "cpu"
    assert ops.kernels_for("triton", cpu_dev) == "triton"
    with pytest.raises(ValueError, match="impl: 'cpu' cannot run here: the CPU kernels run on CPU tensors"):
        ops.kernels_for("cpu", torch.device("cuda"))
    from dms_runtime.paged import backends

    assert backends.resolve("auto", cpu_dev).name == "cpu"
    assert "cpu" in backends.names()


def test_without_the_module_auto_falls_back_and_cpu_says_why(monkeypatch):
    from dms_runtime.paged import backends

    monkeypatch.setattr(cpu, "_cpu", None)
    monkeypatch.setattr(cpu, "_IMPORT_ERROR", "No module named 'dms_kernels._cpu'")
    assert "not built" in cpu.unavailable_reason(torch.device("cpu"))
    assert backends.resolve("auto", torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="backend 'cpu' cannot run on cpu .*not built"):
        backends.resolve("cpu", torch.device("cpu"))
    assert ops.kernels_for("auto", torch.device("cpu")) == "triton"
    with pytest.raises(ValueError, match="impl: 'cpu' cannot run here: dms_kernels._cpu is not built"):
        ops.kernels_for("cpu", torch.device("cpu"))


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("arch,variant", [("llama", "borrowed"), ("qwen3", "adapter"), ("qwen3", "vanilla")])
def test_paged_runtime_on_the_cpu_kernels_gives_reference_tokens(tiny_factory, arch, variant):
    extra = {"dms_window_size": 4, "dms_initial_alpha_offset": 0.0}
    if variant == "adapter":
        extra["dms_separate_alpha"] = True
    folder, _ = tiny_factory(arch=arch, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             **({"head_dim": 16} if arch == "qwen3" else {}),
                             extra_config=None if variant == "vanilla" else extra)
    lm = dr.load(folder)
    if variant == "adapter":
        with torch.no_grad():
            for layer in lm.model.model.layers:
                layer.self_attn.dms_proj_alpha.weight.normal_(0, 0.05)
    ps = [torch.randint(0, 131, (n,)).tolist() for n in (9, 17, 3)]
    ref_out = dr.generate(lm, ps, max_new_tokens=10, ignore_eos=True, backend="oracle")
    got = dr.generate(lm, ps, max_new_tokens=10, ignore_eos=True,
                      paged=dr.PagedConfig(page_size=4, prefill_chunk=6, max_seqs=3))  # auto
    assert got.stats.backend == "paged/cpu"
    assert got.stats.kernels == {"projection": "torch", "prefill": "cpu", "decode": "cpu", "store": "cpu"}
    assert got.token_ids == ref_out.token_ids
    assert [o.live_tokens for o in got.outputs] == [o.live_tokens for o in ref_out.outputs]
    assert (ref_out.stats.kv.compression_ratio > 1.1) == (variant != "vanilla")
