"""The attention backend of one forward pass of the paged runtime."""

from __future__ import annotations

import torch

from .backends import PagedKernels
from .cache import PagedKVCache
from .plan import StepPlan


class PagedStep:
    """What the model calls in every layer of one engine step: ``project`` and ``attend``.

    The step's :class:`StepPlan` (built once, pages reserved) holds everything that does not
    depend on the layer's data; per layer: record the decision of the previous key, attend over
    the held tokens plus the new chunk, then store (tokens leaving the window go to the kept
    store or are dropped; deferring, all go to the kept store with their marks). Nothing here
    reads a device value on the host, so a step can be compiled whole or captured in a CUDA graph.
    """

    def __init__(self, cache: PagedKVCache, plan: StepPlan, kernels: PagedKernels):
        self.cache, self.plan, self.kernels = cache, plan, kernels
        # the torch projection records no decision (the kernels' projection records it, sinks kept)
        self._record = kernels.projection(cache.cfg) == "torch"

    @property
    def slots(self) -> torch.Tensor:
        return self.plan.slots

    def project(self, attn, q_lin, k_lin, h_pre, cos, sin, sinks=None):
        """q/k norm, eviction logits with sinks kept, zeroing, RoPE (and, on the kernels, the previous
        decision)."""
        return self.kernels.project(self.cache, self.plan, self.plan.lists[attn.layer], attn, q_lin, k_lin, h_pre,
                                    cos, sin, sinks)

    def attend(self, layer, q, k, v, logits):
        c, plan = self.cache, self.plan
        lists = plan.lists[layer]  # [B, H]
        b, h, t, _ = k.shape
        new_evict = torch.zeros((b, h, t), dtype=torch.bool, device=k.device)
        if logits is not None:
            a = torch.arange(t, device=k.device)
            nxt = torch.zeros_like(new_evict)
            nxt[..., :-1] = logits[..., 1:] > 0
            new_evict = nxt & (a[None, None, :] + 1 < plan.n_new[:, None, None])  # the last new key: keep
            if self._record:
                c.record_previous_decision(lists, plan.starts, logits[..., 0] > 0)
        if c.defers:  # the marks go to marked_pos / ring_mark; attention and the store see keep
            c.record_marks(plan, lists, plan.kept0[layer], new_evict)
            new_evict = torch.zeros_like(new_evict)
        ring_evict = c.ring_evict[lists]
        out = self.kernels.attend(c, plan, layer, q, k, v, new_evict, ring_evict)
        plan.tokens_read += (plan.n_ring[:, None] + plan.kept0[layer]).sum()  # read on the host once per step
        keep = c.leaving_kept(plan, lists, new_evict)
        self.kernels.store(c, plan, layer, lists, k, v, new_evict, keep)
        c.kept_len[lists] = plan.kept0[layer] + keep.sum(-1)
        return out
