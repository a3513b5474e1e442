"""The fused projection epilogue against the model's torch path and dms_kernels.reference."""

import os

import pytest
import torch

from dms_kernels import reference as ref

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1 (set by the test run)")


def rms(x, w, eps):
    return w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("variant", ["borrowed", "adapter", None])
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("b,t,hq,h,d,dtype", [(2, 5, 8, 2, 16, torch.float32), (1, 1, 4, 4, 32, torch.float32),
                                              (3, 3, 6, 2, 64, torch.float32), (2, 4, 8, 1, 128, torch.bfloat16)])
def test_project_matches_the_reference_path(variant, qk_norm, b, t, hq, h, d, dtype, sinks):
    from dms_kernels.triton.project_op import fused_project

    q_raw, k_raw = (torch.randn(b, t, hq * d) * 0.1).to(dtype), torch.randn(b, t, h * d).to(dtype)
    qw, kw = (torch.rand(d) + 0.5).to(dtype), (torch.rand(d) + 0.5).to(dtype)
    # first positions 0, 2 (a chunk starting among the sinks: its first logit decides sink key 1), 7
    starts = torch.tensor([0, 2, 7])[torch.arange(b) % 3]
    pos = starts[:, None] + torch.arange(t)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([pos[..., None] * inv] * 2, -1)[:, None]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    adapter = torch.randn(b, h, t)
    lists = torch.arange(b * h).view(b, h) * 3
    ring = torch.zeros(b * h * 3, 4, dtype=torch.bool)
    q, k, logits = fused_project(q_raw, k_raw, cos, sin, num_kv_heads=h, q_norm_weight=qw if qk_norm else None,
                                 k_norm_weight=kw if qk_norm else None, eps=1e-6, variant=variant,
                                 adapter_logits=adapter, scale=100.0, offset=5.0, ring_evict=ring, lists=lists,
                                 starts=starts, n_new=torch.full((b,), t), sink_tokens=sinks)
    eq = q_raw.view(b, t, hq, d).transpose(1, 2)
    ek = k_raw.view(b, t, h, d).transpose(1, 2)
    if qk_norm:
        eq, ek = rms(eq, qw, 1e-6), rms(ek, kw, 1e-6)
    exp_logits = None
    if variant == "borrowed":
        exp_logits = ref.eviction_logits(eq, h, 100.0, 5.0)
        eq = ref.zero_borrowed_channel(eq, h)
    elif variant == "adapter":
        exp_logits = adapter
    if exp_logits is not None:
        exp_logits = ref.keep_sinks(exp_logits.float(), ref.sink_mask(pos, sinks))
    eq, ek = rope(eq, cos, sin), rope(ek, cos, sin)
    if variant == "borrowed":
        eq = ref.zero_borrowed_channel(eq, h)
    # bf16: the normed inputs may differ by an ulp (2^-8 relative) from torch's; RoPE adds two such
    # terms of |x| up to ~4, then rounds again: absolute errors up to ~0.05
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 6e-2)
    torch.testing.assert_close(q, eq, rtol=rtol, atol=atol)
    torch.testing.assert_close(k, ek, rtol=rtol, atol=atol)
    if variant is None:
        assert logits is None and not ring.any()
        return
    # In bf16 the q-norm output may differ from torch's by a bf16 ulp or two (another summation
    # order), which moves a borrowed logit by up to ~2 * scale * 2^-8 * |q|: allow that, and check
    # decisions only where the logit is farther than that from 0.
    atol, rtol = (1e-4, 1e-5) if dtype == torch.float32 else (100.0 * 2.0**-6, 2.0**-5)
    torch.testing.assert_close(logits, exp_logits.float(), rtol=rtol, atol=atol)
    expected_ring = torch.zeros_like(ring)
    clear = torch.ones_like(ring)
    for bi in range(b):
        if starts[bi] >= 1:
            expected_ring[lists[bi], (starts[bi] - 1) % 4] = exp_logits[bi, :, 0] > 0
            clear[lists[bi], (starts[bi] - 1) % 4] = exp_logits[bi, :, 0].abs() > atol
    assert torch.equal(ring[clear], expected_ring[clear])


@pytest.mark.parametrize("bad", [-1, 2**31, 1.5, True])
def test_project_rejects_a_bad_sink_count(bad):
    from dms_kernels.triton.project_op import fused_project

    q_raw, k_raw = torch.randn(1, 2, 4 * 16), torch.randn(1, 2, 2 * 16)
    cos, sin = torch.ones(1, 2, 16), torch.zeros(1, 2, 16)
    with pytest.raises(ValueError, match="sink_tokens: expected an int"):
        fused_project(q_raw, k_raw, cos, sin, num_kv_heads=2, sink_tokens=bad)


def test_project_op_schema_and_fake_with_sinks():
    """``torch.ops.dms.fused_project`` (the op the paged runtime calls) takes ``sink_tokens`` and
    records the kept decision in the ring it mutates."""
    import dms_kernels.ops  # noqa: F401  (registers torch.ops.dms.*)

    b, t, hq, h, d = 2, 3, 4, 2, 16
    # borrowed logit = 100 * q[..., D-1] - 5: channel D-1 of every first head of a group set high (evict)
    q_raw = torch.zeros(b, t, hq, d)
    q_raw[..., ::2, d - 1] = 1.0
    q_raw = q_raw.view(b, t, hq * d)
    k_raw, cos, sin = torch.randn(b, t, h * d), torch.ones(b, t, d), torch.zeros(b, t, d)
    starts, lists = torch.tensor([2, 9]), torch.tensor([[0, 1], [2, 3]])
    args = (q_raw, k_raw, cos, sin, None, None, None, torch.zeros(4, 8, dtype=torch.bool), lists, starts,
            torch.full((b,), t), h, "borrowed", 1e-6, 100.0, 5.0, 2)
    torch.library.opcheck(torch.ops.dms.fused_project.default, args, test_utils=("test_schema", "test_faketensor"))
    ring = torch.zeros(4, 8, dtype=torch.bool)
    _, _, logits = torch.ops.dms.fused_project(*args[:7], ring, *args[8:])
    # sequence 0 starts at 2: position 2 decides key 1, a sink (kept); 3 and 4 evict as the logit says
    assert torch.equal(logits[0] == ref.SINK_LOGIT, torch.tensor([[True, False, False]] * h))
    assert not ring[:2].any()  # key 1's recorded decision: kept
    assert ring[2:, 8 % 8].all()  # sequence 1 starts at 9, no sink: key 8 recorded as evicted
    assert (logits[1] > 0).all()
