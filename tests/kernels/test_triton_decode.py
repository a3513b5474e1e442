"""The Triton paged decode kernel (interpreted on CPU) against dms_kernels.reference, and its
ahead-of-time build for sm_90a."""

import os
import subprocess

import pytest
import torch

from paged_lists import dense_lists, random_cache, reference_decode

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1 (set by the test run)")


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
    k_pool, v_pool, table, R = random_cache(b, h, d, ps, w, n_ring, kept, dtype)
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
    k_pool, v_pool, table, R = random_cache(b, h, d, ps, w, n_ring, kept, torch.float32)
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
    k_pool, v_pool, table, R = random_cache(b, h, d, ps, w, n_ring, kept, torch.float32)
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
