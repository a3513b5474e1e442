"""Random arrivals, chunk lengths, decisions, forks, preemptions and finishes drive the paged
cache; after every step the pool's invariants hold, attention equals the reference over each
sequence's full history, and every list holds exactly the reference's live tokens."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dms_kernels import reference as ref
from dms_runtime.config import DMSConfig, ModelConfig
from dms_runtime.engine.scheduler import Scheduler
from dms_runtime.paged import PagedConfig, PagedKVCache
from dms_runtime.paged.torch_kernels import torch_paged_attention
from dms_runtime.paged.backends import TorchKernels
from dms_runtime.paged.plan import StepPlan
from dms_runtime.paged.step import PagedStep

L, HQ, H, D, MAX_LEN = 2, 4, 2, 4, 48


def model_config(window, d=D):
    return ModelConfig(arch="llama", vocab_size=8, hidden_size=16, intermediate_size=8, num_layers=L, num_heads=HQ,
                       num_kv_heads=H, head_dim=d, rms_norm_eps=1e-6, max_position_embeddings=MAX_LEN,
                       rope_theta=1e4, rope_scaling=None, attention_bias=False, o_bias=False, mlp_bias=False,
                       qk_norm=False, tie_word_embeddings=False, dms=DMSConfig(window_size=window))


class History:
    """Everything a sequence has put through attention: per layer k, v [H, T, D] and logits [H, T]."""

    def __init__(self, d=D, dtype=torch.float64):
        self.d, self.dtype = d, dtype
        self.k = [torch.zeros(H, 0, d, dtype=dtype) for _ in range(L)]
        self.v = [torch.zeros(H, 0, d, dtype=dtype) for _ in range(L)]
        self.logits = [torch.zeros(H, 0, dtype=torch.float32) for _ in range(L)]

    def copy(self):
        h = History(self.d, self.dtype)
        h.k, h.v, h.logits = list(self.k), list(self.v), list(self.logits)
        return h

    @property
    def length(self):
        return self.k[0].shape[1]


class FnKernels(TorchKernels):
    """The torch kernel set with its attention (and store mover) replaced by plain functions of the
    kernels' signatures, e.g. the Triton wrappers called directly."""

    def __init__(self, attention, store=None):
        self.attention, self.mover = attention, store

    def attend(self, cache, plan, layer, q, k, v, new_evict, ring_evict):
        return self.attention(q, k, v, new_evict, plan.n_new, plan.starts, cache.k_pool, cache.v_pool,
                              plan.tables[layer], plan.kept0[layer], ring_evict, cache.w, cache.R)

    def store(self, cache, plan, layer, lists, k, v, new_evict, keep):
        if self.mover is None:
            return super().store(cache, plan, layer, lists, k, v, new_evict, keep)
        self.mover(k, v, new_evict, cache.k_pool, cache.v_pool, cache.page_table, cache.ring_evict, lists,
                   plan.kept0[layer], plan.starts, plan.n_new, cache.w, cache.R)


class Harness:
    def __init__(self, window, page_size, num_pages, max_seqs, attention=torch_paged_attention, d=D,
                 dtype=torch.float64, tol=1e-9, store=None):
        self.attention, self.d, self.tol, self.store = attention, d, tol, store
        self.w = window
        self.cache = PagedKVCache(model_config(window, d), PagedConfig(page_size=page_size, max_seqs=max_seqs,
                                                                     num_pages=num_pages),
                                  dtype, "cpu", MAX_LEN)
        self.sched = Scheduler(self.cache, 64)
        self.seqs: dict[int, History] = {}  # slot -> history in the cache
        self.free_slots = list(range(max_seqs))

    def step(self, chunks: dict[int, int], evict_p: float, replay: dict[int, History] | None = None):
        """Process ``chunks[slot]`` new positions for each slot (fresh random data, or a replay)."""
        slots = sorted(chunks)
        b, t = len(slots), max(chunks.values())
        starts = torch.tensor([self.seqs[s].length for s in slots])
        plan = StepPlan.build(self.cache, slots, starts.tolist(), [chunks[s] for s in slots])
        step = PagedStep(self.cache, plan, FnKernels(self.attention, self.store))
        for layer in range(L):
            dt = self.cache.dtype
            q = torch.randn(b, HQ, t, self.d, dtype=dt)
            k = torch.randn(b, H, t, self.d, dtype=dt)
            v = torch.randn(b, H, t, self.d, dtype=dt)
            logits = torch.where(torch.rand(b, H, t) < evict_p, 1.0, -1.0).to(torch.float32)
            for i, s in enumerate(slots):
                if replay and s in replay:
                    src, a0 = replay[s], int(starts[i])
                    n = chunks[s]
                    k[i, :, :n] = src.k[layer][:, a0 : a0 + n]
                    v[i, :, :n] = src.v[layer][:, a0 : a0 + n]
                    logits[i, :, :n] = src.logits[layer][:, a0 : a0 + n]
            out = step.attend(layer, q, k, v, logits)
            for i, s in enumerate(slots):
                n, hist = chunks[s], self.seqs[s]
                hist.k[layer] = torch.cat([hist.k[layer], k[i, :, :n]], 1)
                hist.v[layer] = torch.cat([hist.v[layer], v[i, :, :n]], 1)
                hist.logits[layer] = torch.cat([hist.logits[layer], logits[i, :, :n]], 1)
                end = hist.length
                dec = ref.eviction_decisions(hist.logits[layer][None])
                exp = ref.dms_attention_cached(q[i : i + 1, :, :n], hist.k[layer][None], hist.v[layer][None], dec,
                                               self.w, (int(starts[i]) + torch.arange(n))[None], torch.tensor([end]))
                torch.testing.assert_close(out[i : i + 1, :, :n], exp, rtol=self.tol, atol=self.tol)
        self.cache.finish_step(plan)
        self.check()

    def new_history(self):
        return History(self.d, self.cache.dtype)

    def check(self):
        self.cache.check_invariants()
        for s, hist in self.seqs.items():
            if hist.length == 0:
                continue
            for layer in range(L):
                dec = ref.eviction_decisions(hist.logits[layer][None])
                exp = ref.live_tokens(dec, self.w, hist.length - 1)[0]
                assert self.cache.live_tokens(s)[layer].tolist() == exp.tolist()

    def fits(self, chunks):
        need = sum(self.sched.step_pages(self.seqs[s].length, n) for s, n in chunks.items())
        return need <= self.cache.free_top


@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), window=st.integers(1, 6), page_size=st.integers(1, 4), evict_p=st.sampled_from([0.0, 0.5, 0.9, 1.0]))
def test_pool_invariants_under_random_traffic(data, window, page_size, evict_p):
    random_traffic(data, Harness(window, page_size, num_pages=400, max_seqs=4), evict_p)


def random_traffic(data, hx, evict_p, max_steps=14):
    waiting: list[History] = []  # preempted sequences, to be recomputed
    for _ in range(data.draw(st.integers(1, max_steps), label="steps")):
        action = data.draw(st.sampled_from(["arrive", "step", "step", "step", "fork", "preempt", "finish", "resume"]))
        running = sorted(hx.seqs)
        if action == "arrive" and hx.free_slots:
            slot = hx.free_slots.pop()
            hx.seqs[slot] = hx.new_history()
            n = data.draw(st.integers(1, 12), label="prompt")
            if hx.fits({slot: n}):
                hx.step({slot: n}, evict_p)
            else:
                del hx.seqs[slot]
                hx.free_slots.append(slot)
        elif action == "step" and running:
            chosen = data.draw(st.lists(st.sampled_from(running), min_size=1, unique=True), label="rows")
            chunks = {s: data.draw(st.integers(1, 5), label="n") for s in chosen}
            chunks = {s: n for s, n in chunks.items() if hx.seqs[s].length + n <= MAX_LEN}
            if chunks and hx.fits(chunks):
                hx.step(chunks, evict_p)
        elif action == "fork" and running and hx.free_slots:
            parent = data.draw(st.sampled_from(running), label="parent")
            if hx.seqs[parent].length and hx.cache.budget.fork_pages() <= hx.cache.free_top:
                child = hx.free_slots.pop()
                hx.cache.fork(parent, child)
                hx.seqs[child] = hx.seqs[parent].copy()
                hx.check()
        elif action in ("preempt", "finish") and running:
            slot = data.draw(st.sampled_from(running), label="victim")
            hist = hx.seqs.pop(slot)
            hx.cache.free_seq(slot)
            hx.free_slots.append(slot)
            if action == "preempt" and hist.length:
                waiting.append(hist)
            hx.check()
        elif action == "resume" and waiting and hx.free_slots:
            hist = waiting.pop(0)
            slot = hx.free_slots.pop()
            hx.seqs[slot] = hx.new_history()
            chunk = data.draw(st.integers(1, 8), label="recompute chunk")
            while hx.seqs[slot].length < hist.length:  # recompute the same history in chunks
                n = min(chunk, hist.length - hx.seqs[slot].length)
                assert hx.fits({slot: n})
                hx.step({slot: n}, evict_p, replay={slot: hist})
    for slot in list(hx.seqs):
        hx.cache.free_seq(slot)
    hx.cache.check_invariants()
    assert hx.cache.pages_in_use == 0 and hx.cache.free_top == hx.cache.P
