"""The heuristic baselines against step-by-step re-implementations written from their papers' rules."""

import math

import pytest
import torch

from dms_runtime.retrofit.policies import PolicyAttention, policy_mask


def naive_evicting(policy, q, k, budget):
    """One KV head at a time, one query at a time, with plain Python sets."""
    hkv, g, t, d = q.shape
    mask = torch.zeros((hkv, t, t), dtype=torch.bool)
    for h in range(hkv):
        cache, acc = [], {}
        for i in range(t):
            cache.append(i)
            for j in cache:
                mask[h, i, j] = True
            s = torch.stack([(q[h, :, i] * k[h, j]).sum(-1) / math.sqrt(d) for j in cache], -1)  # [G, n]
            p = torch.softmax(s, -1).mean(0)
            for j, pj in zip(cache, p.tolist()):
                acc[j] = acc.get(j, 0.0) + pj
            if len(cache) > budget:
                if policy == "tova":
                    victim = cache[int(p.argmin())]
                else:  # h2o: never the budget // 2 most recent
                    old = [j for j in cache if j <= i - budget // 2]
                    victim = min(old, key=lambda j: (acc[j], j))
                cache.remove(victim)
    return mask


def naive_quest(q, k, budget, page):
    hkv, g, t, d = q.shape
    mask = torch.zeros((hkv, t, t), dtype=torch.bool)
    for h in range(hkv):
        for i in range(t):
            own = i // page
            scores = []
            for p in range(own + 1):
                kp = k[h, p * page: min((p + 1) * page, t)]
                hi, lo = kp.max(0).values, kp.min(0).values
                sc = sum(torch.maximum(q[h, x, i] * hi, q[h, x, i] * lo).sum() for x in range(g))
                scores.append(math.inf if p == own else float(sc))
            keep = sorted(range(own + 1), key=lambda p: -scores[p])[: max(1, budget // page)]
            for p in keep:
                mask[h, i, p * page: min((p + 1) * page, i + 1)] = True
    return mask


@pytest.mark.parametrize("policy", ["tova", "h2o"])
@pytest.mark.parametrize("t,budget,g", [(1, 4, 1), (9, 4, 2), (23, 6, 3), (30, 30, 1), (17, 2, 2)])
def test_evicting_policies_match_step_by_step(policy, t, budget, g):
    gen = torch.Generator().manual_seed(t * 7 + budget)
    q = torch.randn(2, g, t, 8, generator=gen)
    k = torch.randn(2, t, 8, generator=gen)
    got = policy_mask(policy, q, k, budget)
    assert torch.equal(got, naive_evicting(policy, q, k, budget))
    # at most budget + 1 keys per query (itself appended before the eviction), all causal
    assert int(got.sum(-1).max()) <= budget + 1
    assert not torch.triu(got, 1).any()


@pytest.mark.parametrize("t,budget,page", [(1, 4, 4), (13, 8, 4), (32, 8, 4), (21, 5, 2), (40, 64, 16)])
def test_quest_matches_page_by_page(t, budget, page):
    gen = torch.Generator().manual_seed(t + budget)
    q = torch.randn(3, 2, t, 8, generator=gen)
    k = torch.randn(3, t, 8, generator=gen)
    got = policy_mask("quest", q, k, budget, page_size=page)
    assert torch.equal(got, naive_quest(q, k, budget, page))
    assert got[:, torch.arange(t), torch.arange(t)].all()  # the own page, hence the query itself, is read


def test_streaming_keeps_sinks_and_the_recent_tokens():
    m = policy_mask("streaming", torch.zeros(1, 1, 12, 4), torch.zeros(1, 12, 4), budget=6, sinks=2)[0]
    assert m[11].nonzero().flatten().tolist() == [0, 1, 8, 9, 10, 11]
    assert m[3].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert int(m.sum(-1).max()) == 6


def test_policy_arguments_are_checked():
    with pytest.raises(ValueError, match="policy: expected one of"):
        policy_mask("lru", torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4), 4)
    with pytest.raises(ValueError, match="budget: expected an int >= 2"):
        PolicyAttention("tova", 1)


@pytest.mark.parametrize("policy", ["streaming", "tova", "h2o", "quest"])
def test_a_budget_as_large_as_the_sequence_is_full_attention(policy):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 20, 16, generator=gen) for h in (4, 2, 2))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    backend = PolicyAttention(policy, 32)
    torch.testing.assert_close(backend.attend(0, q, k, v, None), ref, atol=1e-5, rtol=1e-5)
    assert backend.reads == 2 * 20 * 21 // 2 and backend.held_end == 2 * 20


def test_a_small_budget_changes_the_output_and_counts_reads():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, h, 40, 16, generator=gen) for h in (4, 2, 2))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    backend = PolicyAttention("tova", 8)
    out = backend.attend(0, q, k, v, None)
    assert not torch.allclose(out, ref, atol=1e-3) and torch.isfinite(out).all()
    assert backend.held_peak == 2 * 8 and backend.reads < 2 * 40 * 41 // 2


@pytest.mark.parametrize("policy", ["tova", "h2o"])
def test_evicting_policies_across_row_chunks(policy):
    from dms_runtime.retrofit.policies import evicting_mask

    gen = torch.Generator().manual_seed(11)
    q, k = torch.randn(2, 3, 29, 8, generator=gen), torch.randn(2, 29, 8, generator=gen)
    want = naive_evicting(policy, q, k, 5)
    for rows in (1, 4, 7):
        assert torch.equal(evicting_mask(policy, q, k, 5, rows=rows), want)


@pytest.mark.parametrize("policy", ["tova", "h2o"])
def test_ties_evict_the_oldest_key(policy):
    """Zero queries attend uniformly: every score ties, and the oldest evictable key goes (TOVA
    becomes a sliding window)."""
    q, k = torch.zeros(2, 2, 21, 8), torch.randn(2, 21, 8, generator=torch.Generator().manual_seed(5))
    got = policy_mask(policy, q, k, 6)
    assert torch.equal(got, naive_evicting(policy, q, k, 6))
    if policy == "tova":
        assert got[0, 20].nonzero().flatten().tolist() == list(range(14, 21))


@pytest.mark.parametrize("t,budget,sinks,rows", [(1, 4, 2, 3), (13, 6, 2, 4), (40, 9, 4, 7), (25, 25, 4, 8), (17, 3, 4, 5)])
def test_streaming_plan_is_the_streaming_mask(t, budget, sinks, rows):
    from dms_runtime.retrofit.policies import plan_mask, streaming_mask, streaming_plan

    plan = streaming_plan(t, 2, budget, sinks, rows)
    assert torch.equal(plan_mask(plan, 2, t), streaming_mask(t, budget, sinks).expand(2, -1, -1))
    # a chunk lists only keys its queries can read: at most the sinks, the window and the chunk's own keys
    assert all(keys.shape[1] <= min(sinks, budget - 1) + budget + m.shape[1] for _, keys, m in plan)


@pytest.mark.parametrize("rows", [1, 4, 7])
def test_quest_across_row_chunks(rows):
    from dms_runtime.retrofit.policies import plan_mask, quest_plan

    gen = torch.Generator().manual_seed(12)
    q, k = torch.randn(2, 2, 30, 8, generator=gen), torch.randn(2, 30, 8, generator=gen)
    assert torch.equal(plan_mask(quest_plan(q, k, 8, 4, rows), 2, 30), naive_quest(q, k, 8, 4))


@pytest.mark.parametrize("policy", ["streaming", "tova", "h2o", "quest"])
@pytest.mark.parametrize("t,budget", [(1, 4), (2, 2), (37, 7), (64, 16)])
def test_plan_attention_is_the_dense_masked_attention(policy, t, budget):
    """Each chunk attends over only the keys its plan lists: the same output and reads as the dense
    masked attention over all positions (rows smaller than the budget, so chunks cross it)."""
    from dms_runtime.retrofit.policies import masked_attention, plan_attention, plan_mask, plan_reads, policy_plan

    gen = torch.Generator().manual_seed(t + budget)
    q, k, v = torch.randn(2, 3, t, 8, generator=gen), torch.randn(2, t, 8, generator=gen), torch.randn(2, t, 8, generator=gen)
    plan = policy_plan(policy, q, k, budget, sinks=2, page_size=4, rows=5)
    mask = plan_mask(plan, 2, t)
    torch.testing.assert_close(plan_attention(q, k, v, plan), masked_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    assert plan_reads(plan) == int(mask.sum())


@pytest.mark.parametrize("policy", ["streaming", "tova", "h2o"])
@pytest.mark.parametrize("t,budget", [(1, 2), (2, 2), (23, 2), (23, 7), (23, 22), (23, 23), (23, 40)])
def test_policy_reads_count_what_the_policy_reads(policy, t, budget):
    from dms_runtime.retrofit.policies import policy_reads

    gen = torch.Generator().manual_seed(t * 100 + budget)
    q, k, v = (torch.randn(1, h, t, 8, generator=gen) for h in (4, 2, 2))
    backend = PolicyAttention(policy, budget)
    backend.attend(0, q, k, v, None)
    assert backend.reads == 2 * policy_reads(policy, budget, t)


@pytest.mark.parametrize("policy", ["streaming", "tova", "h2o", "quest"])
@pytest.mark.parametrize("length", [1, 2, 17, 300])
def test_read_budget_is_the_smallest_that_reads_enough(policy, length):
    from dms_runtime.retrofit.policies import policy_reads, read_budget

    dense = length * (length + 1) // 2
    for fraction in (0.01, 0.137, 0.5, 0.93, 1.0):
        b = read_budget(policy, fraction, length)
        assert b >= 2 and policy_reads(policy, b, length) >= fraction * dense
        if b > 2:
            assert policy_reads(policy, b - 1, length) < fraction * dense
    with pytest.raises(ValueError, match="read_fraction"):
        read_budget(policy, 0.0, length)
    with pytest.raises(ValueError, match="length"):
        read_budget(policy, 0.5, 0)
