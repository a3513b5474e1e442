"""The Triton paged decode kernel (interpreted on CPU) against dms_kernels.reference, and its
ahead-of-time build for sm_90a."""

import os
import subprocess

import pytest
import torch

from dms_kernels import reference as ref

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1 (set by the test run)")


def random_cache(b, h, g, d, ps, w, n_ring, kept, dtype, device="cpu"):
    """A pool with the lists' tokens scattered over shuffled pages; returns pool, table and the
    dense per-list tokens [B, H, n, D] in the kernel's logical order (ring slots, then kept)."""
    R = -(-w // ps)
    kcols = -(-int(kept.max()) // ps) if kept.numel() else 0
    tw = R + max(kcols, 1)
    n_pages = b * h * tw + 3
    perm = torch.randperm(n_pages)
    k_pool = torch.randn(n_pages, ps, d, dtype=dtype, device=device)
    v_pool = torch.randn(n_pages, ps, d, dtype=dtype, device=device)
    table = torch.full((b, h, tw), -1, dtype=torch.int64)
    it = iter(perm.tolist())
    for bi in range(b):
        for hi in range(h):
            for c in range(-(-int(n_ring[bi]) // ps)):
                table[bi, hi, c] = next(it)
            for c in range(-(-int(kept[bi, hi]) // ps)):
                table[bi, hi, R + c] = next(it)
    return k_pool, v_pool, table.to(device), R


def dense_lists(k_pool, v_pool, table, n_ring, kept, R):
    b, h, _ = table.shape
    ps, d = k_pool.shape[1], k_pool.shape[2]
    lens = n_ring[:, None] + kept
    n = int(lens.max()) if lens.numel() else 0
    k = torch.zeros(b, h, n + 1, d, dtype=k_pool.dtype)
    v = torch.zeros_like(k)
    for bi in range(b):
        for hi in range(h):
            for i in range(int(lens[bi, hi])):
                if i < n_ring[bi]:
                    page, off = table[bi, hi, i // ps], i % ps
                else:
                    j = i - int(n_ring[bi])
                    page, off = table[bi, hi, R + j // ps], j % ps
                k[bi, hi, i], v[bi, hi, i] = k_pool[page, off], v_pool[page, off]
    return k, v, lens


def reference_decode(q, k_new, v_new, k_lists, v_lists, lens):
    """Each list as its own row: held tokens then the new token, all visible (decode)."""
    b, hq, d = q.shape
    h = k_new.shape[1]
    g = hq // h
    out = torch.empty(b, hq, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            n = int(lens[bi, hi])
            kk = torch.cat([k_lists[bi, hi, :n], k_new[bi, hi][None]])[None, None].double()
            vv = torch.cat([v_lists[bi, hi, :n], v_new[bi, hi][None]])[None, None].double()
            qq = q[bi, hi * g : (hi + 1) * g][None, :, None].double()
            dec = torch.zeros(1, 1, n + 1, dtype=torch.bool)
            o = ref.dms_attention_cached(qq, kk, vv, dec, 1, torch.tensor([[n]]), torch.tensor([n + 1]))
            out[bi, hi * g : (hi + 1) * g] = o[0, :, 0]
    return out


TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,h,g,d,ps,w", [(3, 2, 4, 64, 16, 32), (2, 1, 8, 128, 4, 7), (1, 3, 1, 64, 1, 3)])
def test_decode_matches_reference(dtype, b, h, g, d, ps, w):
    from dms_kernels.triton.decode_op import paged_decode_attention

    # ragged: empty lists, a single token, exactly a page, a window boundary, long kept stores
    n_ring = torch.randint(0, w + 1, (b,))
    n_ring[0] = 0
    kept = torch.randint(0, 150, (b, h))
    kept[0, 0] = 0
    if b > 1:
        n_ring[1] = w
        kept[1, 0] = ps
    if h > 1:
        kept[0, 1] = 1
    k_pool, v_pool, table, R = random_cache(b, h, g, d, ps, w, n_ring, kept, dtype)
    q = torch.randn(b, h * g, d, dtype=dtype)
    k_new, v_new = torch.randn(b, h, d, dtype=dtype), torch.randn(b, h, d, dtype=dtype)
    out = paged_decode_attention(q, k_new, v_new, k_pool, v_pool, table, n_ring, kept, R, block_n=16)
    kl, vl, lens = dense_lists(k_pool, v_pool, table, n_ring, kept, R)
    exp = reference_decode(q, k_new, v_new, kl, vl, lens)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), exp, rtol=TOL[dtype], atol=TOL[dtype])


def test_empty_splits_get_zero_weight():
    """A head with nothing held: only the new token counts (an -inf LSE must not become weight 1)."""
    from dms_kernels.triton.decode_op import paged_decode_attention

    b, h, g, d, ps, w = 2, 2, 2, 64, 16, 16
    n_ring = torch.tensor([0, 16])
    kept = torch.tensor([[0, 0], [0, 300]])
    k_pool, v_pool, table, R = random_cache(b, h, g, d, ps, w, n_ring, kept, torch.float32)
    q = torch.randn(b, h * g, d)
    k_new, v_new = torch.randn(b, h, d), torch.randn(b, h, d)
    out = paged_decode_attention(q, k_new, v_new, k_pool, v_pool, table, n_ring, kept, R, block_n=16)
    torch.testing.assert_close(out[0], v_new[0].repeat_interleave(g, 0))


def test_bad_arguments_are_named():
    from dms_kernels.triton.decode_op import paged_decode_attention

    q = torch.randn(1, 4, 64)
    kn = torch.randn(1, 2, 64)
    pool = torch.randn(4, 16, 64)
    table = torch.zeros(1, 2, 2, dtype=torch.int64)
    nr = torch.zeros(1, dtype=torch.int64)
    kept = torch.zeros(1, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="table"):
        paged_decode_attention(q, kn, kn, pool, pool, table.int(), nr, kept, 1)
    with pytest.raises(ValueError, match="k_new"):
        paged_decode_attention(q, kn.half(), kn, pool, pool, table, nr, kept, 1)
    with pytest.raises(ValueError, match="k_pool"):
        paged_decode_attention(q, kn, kn, torch.randn(4, 16, 32), pool, table, nr, kept, 1)


def test_merge_survives_very_negative_scores():
    """All scores near -500: an empty split must still weigh exactly 0 (exp(0 - top) would overflow)."""
    from dms_kernels.triton.decode_op import paged_decode_attention

    b, h, g, d, ps, w = 1, 2, 2, 64, 16, 16
    n_ring, kept = torch.tensor([3]), torch.tensor([[0, 200]])  # head 0 has empty splits, head 1 fills them
    k_pool, v_pool, table, R = random_cache(b, h, g, d, ps, w, n_ring, kept, torch.float32)
    direction = torch.randn(d)
    k_pool[:] = direction
    k_new = direction.expand(b, h, d).clone()
    q = -500.0 * direction / direction.pow(2).sum() * d**0.5
    q = q.expand(b, h * g, d).clone()
    v_new = torch.randn(b, h, d)
    out = paged_decode_attention(q, k_new, v_new, k_pool, v_pool, table, n_ring, kept, R, block_n=16)
    assert torch.isfinite(out).all()
    kl, vl, lens = dense_lists(k_pool, v_pool, table, n_ring, kept, R)
    torch.testing.assert_close(out.double(), reference_decode(q, k_new, v_new, kl, vl, lens), rtol=1e-4, atol=1e-4)
