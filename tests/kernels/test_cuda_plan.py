"""Host side of the CUDA paged kernels, on CPU through the pybind module: the decode plan, the
work partition (every held token read exactly once, from the right page and offset), and the
argument checks of the C ABI (status codes and messages, before any device is touched)."""

import math
import os
import shutil

import pytest
import torch

from dms_kernels import cuda as dcuda

NVCC = shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")
pytestmark = pytest.mark.skipif(not dcuda.built(), reason="dms_kernels._cuda is not built (nvcc not found)")

if dcuda.built():
    C = dcuda._cuda
    BF16, FP16, FP32 = C.DataType.bfloat16, C.DataType.float16, C.DataType.float32


# ----------------------------------------------------------------------------- plan


@pytest.mark.parametrize("lists,group,d,max_tokens,sms", [
    (1, 1, 64, 0, 132), (1, 8, 128, 1, 132), (8, 4, 128, 4096, 132), (64, 4, 128, 4096, 132),
    (17, 3, 64, 97, 132), (2048, 8, 128, 131072, 132), (1, 1, 128, 2_000_000_000, 132), (3, 16, 64, 1000, 1),
])
def test_plan_fields(lists, group, d, max_tokens, sms):
    p = C.decode_plan(lists, group, d, BF16, max_tokens, sms)
    assert (p.num_lists, p.group_size, p.head_dim, p.max_tokens) == (lists, group, d, max_tokens)
    assert p.tile_tokens == 64 and p.threads == 160
    assert p.split_tokens >= p.tile_tokens and p.split_tokens % p.tile_tokens == 0
    assert 1 <= p.num_splits <= 65535
    assert p.num_splits * p.split_tokens >= max_tokens  # the planned maximum fits without the last-split tail
    assert (p.num_splits - 1) * p.split_tokens < max(max_tokens, 1)  # no split is planned empty
    assert p.stages == (4 if d == 64 else 3)
    assert p.smem_bytes == p.stages * 2 * 64 * (d * 2 + 16) and p.smem_bytes <= 227 * 1024
    rows = lists * p.num_splits * group
    r256 = lambda x: -(-x // 256) * 256  # noqa: E731
    assert p.workspace_bytes == r256(rows * d * 4) + 2 * r256(rows * 4)


def test_plan_fills_the_gpu_at_batch_one():
    # 8 lists of 4096 tokens: about 2 CTAs per SM (264), not 8
    p = C.decode_plan(8, 4, 128, BF16, 4096, 132)
    assert 8 * p.num_splits >= 132 and p.split_tokens == 128
    # many lists: one split each, no splitting needed
    p = C.decode_plan(1024, 4, 128, BF16, 4096, 132)
    assert p.num_splits == 1 and p.split_tokens == 4096
    # a short cache never splits below one tile
    p = C.decode_plan(1, 1, 64, FP16, 5, 132)
    assert p.num_splits == 1 and p.split_tokens == 64


def _covered(plan, n):
    ranges = [C.decode_split_range(plan, n, s) for s in range(plan.num_splits)]
    toks = [i for b, e in ranges for i in range(b, e)]
    return ranges, toks


@pytest.mark.parametrize("max_tokens", [0, 1, 63, 64, 65, 200, 4096, 5000])
def test_splits_cover_every_token_exactly_once(max_tokens):
    plan = C.decode_plan(4, 2, 64, BF16, max_tokens, 132)
    s = plan.split_tokens
    for n in sorted({0, 1, 2, 63, 64, 65, s - 1, s, s + 1, max_tokens, max_tokens + 1, 3 * max_tokens + 7}):
        if n < 0:
            continue
        ranges, toks = _covered(plan, n)
        assert toks == list(range(n)), (n, ranges)  # in order, each once
        nonempty = sum(b < e for b, e in ranges)
        assert nonempty == C.splits_with_tokens(n, s, plan.num_splits)
        assert all(b < e for b, e in ranges[:nonempty])  # the merge reads the first `nonempty` splits
        # a list longer than planned is read whole: the last split takes the tail
        if n > plan.num_splits * s:
            assert ranges[-1][1] == n


def test_split_range_argument_checks():
    plan = C.decode_plan(4, 2, 64, BF16, 100, 132)
    with pytest.raises(ValueError, match="split: expected 0..") as e:
        C.decode_split_range(plan, 10, plan.num_splits)
    assert "DMS_ERROR_INVALID_ARGUMENT" in str(e.value)
    with pytest.raises(ValueError, match="list_tokens: expected >= 0, got -1"):
        C.decode_split_range(plan, -1, 0)


def _layout_reads(start, w, kept, ps, R):
    """The tokens a list holds, from docs/ARCHITECTURE.md: ring slot i at (i // ps, i % ps) for
    i < min(start, w), kept token j at (R + j // ps, j % ps)."""
    ring = [(i // ps, i % ps) for i in range(min(start, w))]
    return ring + [(R + j // ps, j % ps) for j in range(kept)]


@pytest.mark.parametrize("start,w,kept,ps", [
    (0, 4, 0, 4), (1, 4, 0, 4), (3, 4, 0, 4), (4, 4, 0, 4), (5, 4, 1, 4),  # empty, one token, the window fills
    (100, 16, 80, 16), (100, 16, 81, 16), (100, 16, 79, 16),  # page boundaries of the kept store
    (50, 7, 30, 4), (9, 7, 2, 4), (6, 7, 0, 4),  # ring not a whole number of pages
    (1000, 3, 500, 1), (300, 256, 200, 16), (5000, 256, 3000, 16),  # page size 1, several tiles and splits
])
def test_decode_reads_follow_the_layout(start, w, kept, ps):
    R = math.ceil(w / ps)
    n = min(start, w) + kept
    plan = C.decode_plan(2, 4, 128, BF16, n, 132)
    reads = C.decode_reads(plan, start, w, kept, R, ps)
    assert [r[2] for r in reads] == list(range(n))  # every logical token once, in order
    assert [(r[3], r[4]) for r in reads] == _layout_reads(start, w, kept, ps, R)
    for split, tile, idx, _, _ in reads:
        b, e = C.decode_split_range(plan, n, split)
        assert b <= idx < e and tile == (idx - b) // plan.tile_tokens
    # no two reads of a list hit the same page slot
    assert len({(c, o) for *_, c, o in reads}) == n


def test_decode_reads_with_a_plan_made_for_fewer_tokens():
    plan = C.decode_plan(1, 1, 64, FP16, 100, 132)
    reads = C.decode_reads(plan, 10_000, 256, 4000, 16, 16)
    assert [r[2] for r in reads] == list(range(4256))


# ----------------------------------------------------------------------------- argument checks


def decode_kwargs(**over):
    """A valid decode call: 2 sequences x 2 KV heads, G = 4, D = 128, bf16, fake aligned pointers."""
    b, h, g, d, ps, w = 2, 2, 4, 128, 16, 32
    kw = dict(dtype=BF16, batch=b, num_kv_heads=h, group_size=g, head_dim=d, page_size=ps, window=w, ring_pages=2,
              table_width=10, scale=d ** -0.5, q=0x10000, q_stride_b=h * g * d, q_stride_h=d, k_new=0x20000,
              v_new=0x30000, new_stride_b=h * d, new_stride_h=d, k_pool=0x40000, v_pool=0x50000,
              pool_stride_page=ps * d, pool_stride_token=d, table=0x60000, table_stride=10, seq_start=0x70000,
              kept_len=0x80000, out=0x90000, out_stride_b=h * g * d, out_stride_h=d, workspace=0xA0000,
              workspace_bytes=1 << 20)
    kw.update(over)
    return kw


def decode_plan_for(kw):
    return C.decode_plan(kw["batch"] * kw["num_kv_heads"], kw["group_size"], kw["head_dim"], kw["dtype"], 100, 132)


@pytest.mark.parametrize("field,value,message", [
    ("head_dim", 96, r"head_dim: expected 64 or 128, got 96"),
    ("group_size", 17, r"group_size: expected 1..16 .* got 17"),
    ("group_size", 0, r"group_size: expected 1..16 .* got 0"),
    ("dtype", "fp32", r"dtype: expected DMS_DTYPE_FLOAT16 or DMS_DTYPE_BFLOAT16 .* got DMS_DTYPE_FLOAT32"),
    ("batch", -1, r"batch: expected >= 0, got -1"),
    ("num_kv_heads", 0, r"num_kv_heads: expected >= 1, got 0"),
    ("page_size", 0, r"page_size: expected >= 1, got 0"),
    ("window", 0, r"window: expected >= 1, got 0"),
    ("ring_pages", 1, r"ring_pages: expected >= ceil\(window / page_size\) = 2, got 1"),
    ("table_width", 1, r"table_width: expected >= ring_pages = 2, got 1"),
    ("scale", float("nan"), r"scale: expected a finite value > 0"),
    ("q", 0, r"q: must not be NULL"),
    ("q", 0x10008, r"q: expected a 16-byte aligned address .* got 0x10008"),
    ("q_stride_h", 100, r"q_stride_h: expected a multiple of 8 elements \(16 bytes\) .* got 100"),
    ("k_new", 0, r"k_new/v_new: pass both or neither"),
    ("k_pool", 0, r"k_pool: must not be NULL"),
    ("v_pool", 0x50004, r"v_pool: expected a 16-byte aligned address"),
    ("pool_stride_token", 64, r"pool_stride_token: expected >= head_dim = 128, got 64"),
    ("pool_stride_page", 128, r"pool_stride_page: expected >= page_size \* pool_stride_token = 2048, got 128"),
    ("table", 0, r"table: must not be NULL"),
    ("table", 0x60004, r"table: expected an 8-byte aligned int64 array"),
    ("table_stride", 5, r"table_stride: expected >= table_width = 10, got 5"),
    ("seq_start", 0, r"seq_start: must not be NULL"),
    ("kept_len", 0, r"kept_len: must not be NULL"),
    ("out", 0, r"out: must not be NULL"),
    ("out_stride_h", 8, r"out_stride_b/out_stride_h: rows of out must not overlap"),
    ("workspace", 0, r"workspace: must not be NULL"),
    ("workspace_bytes", 16, r"workspace_bytes: expected >= \d+ \(plan->workspace_bytes\), got 16"),
])
def test_decode_rejects_bad_arguments_before_the_device(field, value, message):
    kw = decode_kwargs()
    plan = decode_plan_for(kw)
    kw[field] = FP32 if value == "fp32" else value
    with pytest.raises(ValueError, match="DMS_ERROR_INVALID_ARGUMENT: .*dms_paged.cu:\\d+: " + message):
        C.paged_decode(plan, 0, **kw)


def test_decode_checks_the_plan_against_the_call():
    kw = decode_kwargs()
    with pytest.raises(ValueError, match=r"plan: made for num_lists = 8, but batch \* num_kv_heads = 4"):
        C.paged_decode(C.decode_plan(8, 4, 128, BF16, 100, 132), 0, **kw)
    with pytest.raises(ValueError, match=r"plan: made for group_size 4, head_dim 64, DMS_DTYPE_BFLOAT16; the call"):
        C.paged_decode(C.decode_plan(4, 4, 64, BF16, 100, 132), 0, **kw)


def test_decode_keyword_arguments_are_checked():
    kw = decode_kwargs()
    plan = decode_plan_for(kw)
    del kw["table"]
    with pytest.raises(TypeError, match="missing keyword argument: table"):
        C.paged_decode(plan, 0, **kw)
    with pytest.raises(TypeError, match="unexpected keyword argument\\(s\\): tabel"):
        C.paged_decode(plan, 0, tabel=1, **decode_kwargs())


def test_empty_batch_is_a_no_op():
    kw = decode_kwargs(batch=0, q=0, out=0, workspace=0, workspace_bytes=0)
    C.paged_decode(decode_plan_for(kw), 0, **kw)  # nothing to do, no device needed
    C.paged_store(0, **store_kwargs(batch=0, k_new=0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_valid_calls_report_no_device():
    kw = decode_kwargs()
    with pytest.raises(RuntimeError, match="DMS_ERROR_NO_DEVICE: .*no CUDA device"):
        C.paged_decode(decode_plan_for(kw), 0, **kw)
    with pytest.raises(RuntimeError, match="DMS_ERROR_NO_DEVICE: .*no CUDA device"):
        C.paged_store(0, **store_kwargs())


def store_kwargs(**over):
    b, h, t, d, ps, w = 2, 2, 5, 64, 16, 32
    kw = dict(dtype=FP16, batch=b, num_kv_heads=h, head_dim=d, page_size=ps, window=w, ring_pages=2, table_width=10,
              num_new=t, k_new=0x10000, v_new=0x20000, new_stride_b=h * t * d, new_stride_h=t * d, new_stride_t=d,
              new_evict=0x30001, evict_stride_b=h * t, evict_stride_h=t, k_pool=0x40000, v_pool=0x50000,
              pool_stride_page=ps * d, pool_stride_token=d, page_table=0x60000, table_stride=10,
              ring_evict=0x70003, ring_evict_stride=w, lists=0x80000, kept0=0x90000, seq_start=0xA0000,
              n_new=0xB0000)
    kw.update(over)
    return kw


@pytest.mark.parametrize("field,value,message", [
    ("dtype", 7, r"dtype: expected DMS_DTYPE_FLOAT16, DMS_DTYPE_BFLOAT16 or DMS_DTYPE_FLOAT32, got 7"),
    ("head_dim", 4, r"head_dim: expected 1..4096 with head_dim \* element size a multiple of 16 bytes \(8 elements"),
    ("num_new", -1, r"num_new: expected >= 0, got -1"),
    ("ring_pages", 0, r"ring_pages: expected >= ceil\(window / page_size\) = 2, got 0"),
    ("k_new", 0x10004, r"k_new: expected a 16-byte aligned address"),
    ("new_stride_t", 4, r"new_stride_t: expected a multiple of 8 elements"),
    ("new_evict", 0, r"new_evict: must not be NULL"),
    ("page_table", 0, r"page_table: must not be NULL"),
    ("ring_evict_stride", 3, r"ring_evict_stride: expected >= window = 32, got 3"),
    ("lists", 0, r"lists: must not be NULL"),
    ("n_new", 0xB0001, r"n_new: expected an 8-byte aligned int64 array"),
])
def test_store_rejects_bad_arguments_before_the_device(field, value, message):
    kw = store_kwargs()
    kw[field] = value
    with pytest.raises(ValueError, match="DMS_ERROR_INVALID_ARGUMENT: .*" + message):
        C.paged_store(0, **kw)


def test_store_accepts_fp32_rows():
    kw = store_kwargs(dtype=FP32, head_dim=4)  # 16-byte rows
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU (fake pointers)")
    with pytest.raises(RuntimeError, match="DMS_ERROR_NO_DEVICE"):
        C.paged_store(0, **kw)


def test_torch_wrappers_refuse_cpu_tensors():
    q = torch.zeros(1, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="q: expected a CUDA tensor"):
        dcuda.paged_decode_attention(q, None, None, q, q, torch.zeros(1, 1, 1, dtype=torch.int64),
                                     torch.zeros(1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int64), 4, 1)
    assert dcuda.decode_supported(torch.bfloat16, 128, 8) and not dcuda.decode_supported(torch.float32, 128, 8)
    assert not dcuda.decode_supported(torch.float16, 96, 4) and not dcuda.decode_supported(torch.float16, 64, 32)
    assert dcuda.store_supported(torch.float32, 4) and not dcuda.store_supported(torch.float16, 4)


def test_k_and_v_cross_the_abi_with_one_layout():
    """The C ABI takes one set of new-token strides for k_new and v_new; the runtime's k comes fresh
    from the projection kernel while v is a transposed view of v_proj's output."""
    b, t, h, d = 2, 5, 4, 64
    k = torch.randn(b, h, t, d, dtype=torch.bfloat16)
    v = torch.randn(b, t, h * d, dtype=torch.bfloat16).view(b, t, h, d).transpose(1, 2)
    assert k.stride() != v.stride()
    k2, v2 = dcuda._shared_layout(k, v)
    assert k2.stride() == v2.stride() and torch.equal(k2, k) and torch.equal(v2, v)
    k3, v3 = dcuda._shared_layout(k, k[:, :, :1].expand(b, h, t, d).contiguous())
    assert k3.data_ptr() == k.data_ptr()  # already one 16-byte-aligned layout: no copy
