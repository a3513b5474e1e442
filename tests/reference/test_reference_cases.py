"""Hand-computed cases for dms_kernels.reference: window 1 and 2, GQA groups 1 and 4,
decisions at the first and last positions, strict ``> 0``, the ``<=`` window edge."""

import math

import pytest
import torch
import torch.nn.functional as F

from dms_kernels import reference as ref

# logits at positions 0..4; decisions are read one position later, so key j uses logits[j+1].
LOGITS = torch.tensor([[[3.0, -1.0, 2.0, 0.0, 7.0]]])
DECISIONS = [False, True, False, True, False]  # j=2: logit 0 is not > 0; j=4: last key, keep


def test_decisions_are_shifted_by_one_and_strict():
    assert ref.eviction_decisions(LOGITS)[0, 0].tolist() == DECISIONS


def test_first_positions_logit_decides_nothing_last_key_kept():
    d = ref.eviction_decisions(torch.tensor([[[9.0, -1.0, -1.0]]]))
    assert d[0, 0].tolist() == [False, False, False]
    d = ref.eviction_decisions(torch.tensor([[[-1.0, -1.0, 9.0]]]))
    assert d[0, 0].tolist() == [False, True, False]
    d = ref.eviction_decisions(torch.tensor([[[9.0]]]))
    assert d[0, 0].tolist() == [False]


def test_visibility_window_1():
    mask = ref.visibility_mask(torch.tensor([[DECISIONS]]), 1)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 0, 1, 1, 0],  # key 1 (evicted) was last seen by query 1 + w = 2
        [1, 0, 1, 1, 1],  # key 3 (evicted) still seen at distance 1 = w
    ]


def test_visibility_window_2():
    mask = ref.visibility_mask(torch.tensor([[DECISIONS]]), 2)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],  # distance 2 <= w: still visible
        [1, 0, 1, 1, 1],  # distance 3 > w: gone
    ]


def test_decision_on_the_first_key_evicts_it_after_the_window():
    d = torch.tensor([[[True, False, False, False]]])
    mask = ref.visibility_mask(d, 2)[0, 0]
    assert mask[:, 0].tolist() == [True, True, True, False]


@pytest.mark.parametrize("window,t,expected", [(1, 4, 3), (1, 2, 2), (1, 1, 2), (2, 4, 4), (2, 2, 3), (1, 0, 1), (1, -1, 0)])
def test_live_tokens_hand(window, t, expected):
    assert ref.live_tokens(torch.tensor([[DECISIONS]]), window, t).tolist() == [[expected]]


def test_live_tokens_equals_what_the_next_query_sees():
    for _ in range(20):
        t_len = int(torch.randint(2, 40, ()))
        w = int(torch.randint(1, 6, ()))
        d = torch.rand(2, 3, t_len) < 0.6
        d[..., -1] = False
        vis = ref.visibility_mask(d, w)
        for t in range(t_len - 1):
            live = ref.live_tokens(d, w, t)
            assert torch.equal(live, vis[:, :, t + 1, : t + 1].sum(-1))


def _uniform_case(hq, decisions_per_kv, window):
    """q = 0 makes attention a plain mean of the visible values: easy to compute by hand."""
    t = len(decisions_per_kv[0])
    hkv = len(decisions_per_kv)
    q = torch.zeros(1, hq, t, 2, dtype=torch.float64)
    k = torch.randn(1, hkv, t, 2, dtype=torch.float64)
    v = torch.zeros(1, hkv, t, 2, dtype=torch.float64)
    for h in range(hkv):
        v[0, h, :, 0] = torch.arange(t, dtype=torch.float64) + 10 * h
        v[0, h, :, 1] = 1.0
    d = torch.tensor([decisions_per_kv])
    return ref.dms_attention(q, k, v, d, window)


def test_attention_gqa_group_1_by_hand():
    out = _uniform_case(1, [DECISIONS], 1)
    # visible rows (window 1): {0}, {0,1}, {0,1,2}, {0,2,3}, {0,2,3,4}
    assert out[0, 0, :, 0].tolist() == pytest.approx([0.0, 0.5, 1.0, 5 / 3, 9 / 4])
    assert out[0, 0, :, 1].tolist() == pytest.approx([1.0] * 5)


def test_attention_gqa_group_4_by_hand():
    out = _uniform_case(8, [[False] * 5, DECISIONS], 2)
    for h in range(4):  # query heads 0..3 read KV head 0 (nothing evicted)
        assert out[0, h, :, 0].tolist() == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    for h in range(4, 8):  # query heads 4..7 read KV head 1; window 2: row 4 loses key 1
        assert out[0, h, :, 0].tolist() == pytest.approx([10.0, 10.5, 11.0, 11.5, 10 + 9 / 4])


def test_attention_matches_a_loop_oracle():
    b, hq, hkv, t, d, w = 2, 6, 3, 11, 8, 3
    q, k, v = torch.randn(b, hq, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    dec = torch.rand(b, hkv, t) < 0.5
    out = ref.dms_attention(q, k, v, dec, w, scale=0.3)
    g = hq // hkv
    for bi in range(b):
        for h in range(hq):
            for i in range(t):
                js = [j for j in range(i + 1) if i - j <= w or not dec[bi, h // g, j]]
                s = torch.stack([q[bi, h, i] @ k[bi, h // g, j] * 0.3 for j in js])
                p = torch.softmax(s, 0)
                exp = sum(p[n] * v[bi, h // g, j] for n, j in enumerate(js))
                torch.testing.assert_close(out[bi, h, i], exp, rtol=1e-5, atol=1e-5)


def test_cached_attention_equals_full_and_empty_rows_are_zero():
    b, hq, hkv, t, d, w = 3, 4, 2, 9, 4, 2
    q, k, v = torch.randn(b, hq, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    dec = torch.rand(b, hkv, t) < 0.5
    full = ref.dms_attention(q, k, v, dec, w)
    pos = torch.arange(t).expand(b, t)
    cached = ref.dms_attention_cached(q, k, v, dec, w, pos, torch.full((b,), t))
    torch.testing.assert_close(cached, full)
    # the last query alone, over a longer cache with garbage past the length
    big_k = torch.cat([k, torch.randn(b, hkv, 5, d)], 2)
    big_v = torch.cat([v, torch.full((b, hkv, 5, d), float("nan"))], 2)
    big_d = torch.cat([dec, torch.ones(b, hkv, 5, dtype=torch.bool)], 2)
    last = ref.dms_attention_cached(q[:, :, -1:], big_k, big_v, big_d, w, pos[:, -1:], torch.full((b,), t))
    torch.testing.assert_close(last, full[:, :, -1:])
    empty = ref.dms_attention_cached(q, k, v, dec, w, pos, torch.zeros(b, dtype=torch.int64))
    assert torch.equal(empty, torch.zeros_like(empty))


def test_eviction_logits_reads_last_channel_of_each_groups_first_head():
    q = torch.randn(1, 4, 2, 3)
    q[0, 0, :, 2] = torch.tensor([0.0625, 0.03125])
    q[0, 2, :, 2] = torch.tensor([0.5, -0.25])
    logits = ref.eviction_logits(q, num_kv_heads=2)
    assert logits.dtype == torch.float32
    assert logits[0].tolist() == [[1.25, -1.875], [45.0, -30.0]]
    assert ref.eviction_logits(q, 2, scale=2.0, offset=0.5)[0, 1].tolist() == [0.5, -1.0]


def test_eviction_logits_computed_in_float32_for_bf16():
    # bf16(0.05) = 0.050048828125; in float32 the logit is +0.0049 (evict), in bf16 it rounds to 0 (keep).
    q = torch.zeros(1, 1, 2, 4, dtype=torch.bfloat16)
    q[0, 0, 1, 3] = 0.05
    logits = ref.eviction_logits(q, 1)
    assert logits.dtype == torch.float32
    assert logits[0, 0, 1].item() == pytest.approx(0.0048828125)
    assert ref.eviction_decisions(logits)[0, 0, 0].item() is True
    assert (q[0, 0, 1, 3] * 100 - 5).item() == 0.0  # the trap the float32 rule avoids


def test_zero_borrowed_channel_touches_only_first_head_of_each_group():
    q = torch.randn(2, 8, 3, 4)
    out = ref.zero_borrowed_channel(q, 2)
    assert torch.equal(out[:, [0, 4], :, 3], torch.zeros(2, 2, 3))
    keep = torch.ones_like(q, dtype=torch.bool)
    keep[:, [0, 4], :, 3] = False
    assert torch.equal(out[keep], q[keep])
    assert q[:, 0, :, 3].abs().sum() > 0  # the input is not modified


def test_adapter_logits_by_hand():
    hidden = torch.tensor([[[3.0, 4.0], [1.0, -1.0]]])  # [B=1, T=2, H=2]
    norm_w = torch.tensor([1.0, 2.0])
    proj = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # Hkv = 3
    out = ref.adapter_eviction_logits(hidden, norm_w, proj, torch.tensor([0.0, 0.0, 1.0]), eps=0.0, scale=10.0, offset=1.0)
    r0 = math.sqrt((9 + 16) / 2)
    n0 = [3 / r0, 8 / r0]
    n1 = [1.0, -2.0]  # rms of (1, -1) is 1
    exp = [[n0[0], n1[0]], [n0[1], n1[1]], [n0[0] + n0[1] + 1, n1[0] + n1[1] + 1]]
    exp = [[x * 10 - 1 for x in row] for row in exp]
    assert out.shape == (1, 3, 2)
    torch.testing.assert_close(out[0], torch.tensor(exp), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("sinks,first,expected", [
    (0, 0, []),                       # plain DMS: nothing forced
    (1, 0, [1]),                      # key 0 is decided at position 1
    (3, 0, [1, 2, 3]),
    (3, 2, [2, 3]),                   # a chunk starting at position 2: keys 1 and 2 are decided here
    (3, 4, []),                       # past the sinks
])
def test_sink_mask_marks_the_positions_that_decide_the_first_keys(sinks, first, expected):
    positions = torch.arange(first, first + 6)[None]
    mask = ref.sink_mask(positions, sinks)
    assert positions[mask].tolist() == expected


def test_sinks_are_kept_by_the_decisions_and_the_training_bias():
    """Every logit above 0 (all evicted) but with 2 sinks: keys 0 and 1 stay visible to every query,
    in the decisions (§2) and in training's bias (§4: log(1 - 0) = 0); the other keys do not."""
    t, w = 6, 1
    logits = torch.full((1, 2, t), 5.0)
    kept = ref.keep_sinks(logits, ref.sink_mask(torch.arange(t)[None], 2))
    assert torch.equal(logits, torch.full((1, 2, t), 5.0))  # a new tensor
    dec = ref.eviction_decisions(kept)
    assert dec[0, :, :2].logical_not().all() and dec[0, :, 2:-1].all()
    vis = ref.visibility_mask(dec, w)[0, 0]
    assert vis[t - 1, :2].all() and not vis[t - 1, 2 : t - 2].any()
    noise = torch.full((1, 2, t), 50.0)  # noise far toward eviction does not evict a sink
    bias = ref.training_bias(kept, w, 0.1, noise)[0]
    assert (bias[:, t - 1, :2] == 0).all() and (bias[:, t - 1, 2 : t - 2] < -100).all()


def test_training_bias_by_hand():
    logits = torch.tensor([[[0.3, -0.2, 0.5, 1.0]]])
    noise = torch.tensor([[[0.1, 0.2, -0.3, 0.0]]])
    tau = 0.5
    z = ((logits + noise) / tau)[0, 0]
    bias = ref.training_bias(logits, 1, tau, noise)[0, 0]
    ninf = float("-inf")
    ls = lambda x: F.logsigmoid(-torch.as_tensor(x)).item()  # noqa: E731
    exp = torch.tensor([
        [0.0, ninf, ninf, ninf],
        [0.0, 0.0, ninf, ninf],
        [ls(z[1]), 0.0, 0.0, ninf],
        [ls(z[1]), ls(z[2]), 0.0, 0.0],
    ])
    torch.testing.assert_close(bias, exp)
    # window 2: only (3, 0) is beyond the window
    bias2 = ref.training_bias(logits, 2, tau, noise)[0, 0]
    assert bias2[3, 0].item() == pytest.approx(ls(z[1]))
    assert bias2[2, 0].item() == 0.0 and bias2[3, 1].item() == 0.0


def test_training_bias_approaches_the_hard_mask_at_low_temperature():
    x = torch.randn(2, 3, 12)
    logits = torch.sign(x) * (0.5 + x.abs())  # |logit| >= 0.5: z = logit / tau is far from 0
    noise = torch.zeros_like(logits)
    bias = ref.training_bias(logits, 2, 1e-4, noise)
    mask = ref.visibility_mask(ref.eviction_decisions(logits), 2)
    assert torch.equal(bias > -1e3, mask)


def test_hard_decisions_straight_through():
    logits = torch.tensor([[[2.0, -1.0, 0.3]]], requires_grad=True)
    noise = torch.tensor([[[0.0, 0.0, -0.5]]])
    hard = ref.hard_decisions(logits, 0.1, noise)
    assert hard.detach()[0, 0].tolist() == [1.0, 0.0, 0.0]
    hard.sum().backward()
    soft = torch.sigmoid((logits.detach() + noise) / 0.1)
    torch.testing.assert_close(logits.grad, soft * (1 - soft) / 0.1)


def test_compression_loss_by_hand_and_zero_once_target_met():
    hard = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]], [[1.0, 1.0, 1.0, 1.0]]]])  # [L=1, B=2, Hkv=1, T=4]
    assert ref.compression_loss(hard, 0.75).item() == pytest.approx(0.125)
    assert ref.compression_loss(hard, 0.5).item() == 0.0
    assert ref.compression_loss(torch.zeros(2, 1, 3, 5), 0.0).item() == 0.0


def test_logistic_noise_moments():
    g = torch.Generator().manual_seed(0)
    x = ref.logistic_noise((200_000,), generator=g)
    assert torch.isfinite(x).all()
    assert abs(x.mean().item()) < 0.03
    assert x.var().item() == pytest.approx(math.pi**2 / 3, rel=0.03)
