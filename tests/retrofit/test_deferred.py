"""DMS with deferred eviction against a token-by-token re-implementation with a plain queue."""

import heapq
from collections import deque

import pytest
import torch

import dms_runtime as dr
from dms_runtime.models.full_sequence import FullSequenceAttention
from dms_runtime.retrofit.deferred import DeferredAttention, deferred_forward
from dms_runtime.retrofit.evaluate import fidelity


class StepByStep:
    """One position per forward pass. A held flag per (layer, KV head, key); each key's mark, once known,
    joins one queue in (position, layer, KV head) order; after each position the oldest marked keys out
    of the window leave while the cache holds more than ``pool`` tokens. ``by_logit``: those out of the
    window wait in a heap instead, and the one with the largest eviction logit leaves first."""

    def __init__(self, window, pool, layers, kv_heads, length, drop_at=None, by_logit=False):
        self.w, self.pool = window, pool
        self.drop_at = drop_at  # positions before which keys may leave (default: every position)
        self.held = torch.zeros((layers, kv_heads, length), dtype=torch.bool)
        self.k, self.v, self.logit = [[] for _ in range(layers)], [[] for _ in range(layers)], [[] for _ in range(layers)]
        self.queue = deque()
        self.by_logit, self.heap = by_logit, []
        self.held_after = []

    def drop(self, i):
        """The pool's evictions after position ``i - 1``."""
        if self.drop_at is not None and i not in self.drop_at:
            return
        if self.by_logit:
            while self.queue and self.queue[0][0] <= i - 1 - self.w:
                j, lay, h = self.queue.popleft()
                heapq.heappush(self.heap, (-float(self.logit[lay][j + 1][h]), j, lay, h))
            while self.held.sum() > self.pool and self.heap:
                _, j, lay, h = heapq.heappop(self.heap)
                self.held[lay, h, j] = False
            return
        while self.held.sum() > self.pool and self.queue and self.queue[0][0] <= i - 1 - self.w:
            j, lay, h = self.queue.popleft()
            self.held[lay, h, j] = False

    def attend(self, layer, q, k, v, logits):
        i = len(self.k[layer])
        if layer == 0 and i:  # the cache after position i - 1, before position i is appended
            self.drop(i)
            self.held_after.append(int(self.held.sum()))
        self.k[layer].append(k[0, :, 0])
        self.v[layer].append(v[0, :, 0])
        self.logit[layer].append(logits[0, :, 0])
        if i:  # the new logit decides key i - 1
            for h in range(k.shape[1]):
                if self.logit[layer][i][h] > 0:
                    self.queue.append((i - 1, layer, h))
        self.held[layer, :, i] = True
        keys, vals = torch.stack(self.k[layer], 1), torch.stack(self.v[layer], 1)  # [Hkv, i + 1, D]
        hq, hkv = q.shape[1], k.shape[1]
        out = torch.empty_like(q)
        for x in range(hq):
            h = x // (hq // hkv)
            s = (keys[h] @ q[0, x, 0]) / q.shape[-1] ** 0.5
            s = s.masked_fill(~self.held[layer, h, : i + 1], float("-inf"))
            out[0, x, 0] = torch.softmax(s, -1) @ vals[h]
        return out


def step_by_step(lm, ids, window, pool, drop_at=None, by_logit=False):
    cfg = lm.config
    ref = StepByStep(window, pool, cfg.num_layers, cfg.num_kv_heads, len(ids), drop_at, by_logit)
    with torch.inference_mode():
        out = [lm.model(torch.tensor([[x]]), torch.tensor([[p]]), ref) for p, x in enumerate(ids)]
    ref.drop_at = None
    ref.drop(len(ids))  # after the last position
    ref.held_after.append(int(ref.held.sum()))
    return torch.cat(out, 1), ref


def model(tiny_with_tokenizer, window):
    # the borrowed-neuron logit with offset 0: about half the keys are marked
    return dr.load(tiny_with_tokenizer, dms={"dms_window_size": window, "dms_initial_alpha_offset": 0.0})


@pytest.mark.parametrize("window,length", [(3, 1), (3, 3), (3, 4), (4, 29), (1, 13)])
@pytest.mark.parametrize("pool_share", [0.0, 0.3, 0.6, 1.0])
def test_deferred_matches_token_by_token(tiny_with_tokenizer, window, length, pool_share):
    lm = model(tiny_with_tokenizer, window)
    lists = lm.config.num_layers * lm.config.num_kv_heads
    ids = torch.randint(0, 1000, (length,)).tolist()
    pool = int(pool_share * length * lists)
    got, backend = deferred_forward(lm.model, ids, window, pool)
    want, ref = step_by_step(lm, ids, window, pool)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert backend.held_over_time.tolist() == ref.held_after


@pytest.mark.parametrize("window,length", [(3, 1), (3, 4), (4, 29), (1, 13)])
@pytest.mark.parametrize("pool_share", [0.0, 0.3, 0.6])
def test_logit_order_matches_token_by_token(tiny_with_tokenizer, window, length, pool_share):
    """order="logit": the marked key the adapter is surest of leaves first; the same count held."""
    lm = model(tiny_with_tokenizer, window)
    lists = lm.config.num_layers * lm.config.num_kv_heads
    ids = torch.randint(0, 1000, (length,)).tolist()
    pool = int(pool_share * length * lists)
    got, backend = deferred_forward(lm.model, ids, window, pool, order="logit")
    want, ref = step_by_step(lm, ids, window, pool, by_logit=True)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert backend.held_over_time.tolist() == ref.held_after
    if length == 29 and pool_share == 0.3:  # other keys leave than by age: the test can fail
        oldest, _ = deferred_forward(lm.model, ids, window, pool)
        assert not torch.allclose(oldest, got, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [[13], [5, 8], [2, 9, 1, 1], [1] * 13])
@pytest.mark.parametrize("pool_share", [0.2, 0.5])
@pytest.mark.parametrize("order", ["oldest", "logit"])
def test_per_step_evicts_only_between_passes(tiny_with_tokenizer, steps, pool_share, order):
    """The paged runtime's rule: a pass of any length sees what was held before it and all of its own
    chunk; the pool's evictions happen between passes (one position per pass: the rule per position)."""
    lm = model(tiny_with_tokenizer, 3)
    lists = lm.config.num_layers * lm.config.num_kv_heads
    ids = torch.randint(0, 1000, (13,)).tolist()
    pool = int(pool_share * 13 * lists)
    got, backend = deferred_forward(lm.model, ids, 3, pool, steps=steps, order=order)
    bounds = {sum(steps[:k]) for k in range(1, len(steps))}
    want, ref = step_by_step(lm, ids, 3, pool, drop_at=bounds, by_logit=order == "logit")
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    # after the last pass the pool's rule applies again, so the count matches the per-position one
    assert int(backend.held_over_time[-1]) == ref.held_after[-1]
    if len(steps) > 1:  # evicting per position instead gives other logits: the test can fail
        per_position, _ = deferred_forward(lm.model, ids, 3, pool, order=order)
        assert not torch.allclose(per_position, got, atol=2e-4, rtol=1e-4) or steps == [1] * 13


def test_pool_zero_is_dms_and_a_full_pool_is_full_attention(tiny_with_tokenizer):
    lm = model(tiny_with_tokenizer, 4)
    cfg = lm.config
    ids = torch.randint(0, 1000, (37,)).tolist()
    t = torch.tensor([ids])
    with torch.inference_mode():
        dms = FullSequenceAttention(4, record=True)
        want_dms = lm.model(t, torch.arange(37)[None], dms)
        want_full = lm.model(t, torch.arange(37)[None], FullSequenceAttention(37))
    got, backend = deferred_forward(lm.model, ids, 4, 0)
    torch.testing.assert_close(got, want_dms, atol=2e-4, rtol=1e-4)
    assert any(d.any() for d in dms.decisions.values())  # evictions happened, so the test can fail
    # held after each position: DMS's minimum (evaluate.fidelity's measure)
    row = fidelity(lm, 37, texts=[ids])
    assert backend.held_peak == round(row.peak_live_fraction * 37 * cfg.num_layers * cfg.num_kv_heads)
    everything = 37 * cfg.num_layers * cfg.num_kv_heads
    got, backend = deferred_forward(lm.model, ids, 4, everything)
    torch.testing.assert_close(got, want_full, atol=2e-4, rtol=1e-4)
    assert backend.held_peak == everything and backend.reads == cfg.num_layers * cfg.num_kv_heads * 37 * 38 // 2


def test_a_pool_at_the_dms_peak_holds_it_and_reads_more(tiny_with_tokenizer):
    lm = model(tiny_with_tokenizer, 3)
    ids = torch.randint(0, 1000, (40,)).tolist()
    _, dms = deferred_forward(lm.model, ids, 3, 0)
    _, lazy = deferred_forward(lm.model, ids, 3, dms.held_peak)
    assert lazy.held_peak >= dms.held_peak and lazy.reads > dms.reads
    lists = lm.config.num_layers * lm.config.num_kv_heads
    t = torch.arange(40)
    # held after t: max(the minimum for its own marks, min((t + 1) * lists, pool))
    own = DeferredAttention(3, 0, lm.config.num_layers, lm.config.num_kv_heads).gone_counts(lazy._marks(40), t)
    assert torch.equal(lazy.held_over_time, torch.maximum((t + 1) * lists - own,
                                                          ((t + 1) * lists).clamp(max=dms.held_peak)))


def test_bad_arguments_are_refused(tiny_with_tokenizer):
    with pytest.raises(ValueError, match="pool"):
        DeferredAttention(4, -1, 2, 2)
    with pytest.raises(ValueError, match="window"):
        DeferredAttention(0, 5, 2, 2)
    with pytest.raises(ValueError, match="order"):
        DeferredAttention(4, 5, 2, 2, order="newest")
    lm = model(tiny_with_tokenizer, 4)
    backend = DeferredAttention(4, 5, lm.config.num_layers, lm.config.num_kv_heads)
    with pytest.raises(ValueError, match="chunk"):
        lm.model(torch.zeros((1, 5), dtype=torch.long), torch.arange(5)[None], backend)
    with pytest.raises(ValueError, match="steps: expected positive lengths adding up to 5"):
        deferred_forward(lm.model, [1, 2, 3, 4, 5], 4, 5, steps=[2, 2])
    with pytest.raises(ValueError, match="logits"):
        backend.attend(0, torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8), None)
