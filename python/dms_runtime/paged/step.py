"""The attention backend of one forward pass of the paged runtime."""

from __future__ import annotations

from typing import Callable

import torch

from .cache import PagedKVCache


class PagedStep:
    """New tokens of rows ``slots`` ``[B]`` at positions ``starts + a`` for ``a < n_new`` (right padded).

    Per layer: record the decision of the previous key, attend over the held tokens plus the new
    chunk, then store (tokens leaving the window go to the kept store or are dropped).
    """

    def __init__(self, cache: PagedKVCache, slots: torch.Tensor, starts: torch.Tensor, n_new: torch.Tensor,
                 attention: Callable, logits_hook: Callable | None = None, store: Callable | None = None):
        self.cache = cache
        self.slots, self.starts, self.n_new = slots, starts, n_new
        self.attention = attention
        self.store = store  # the backend's store mover (None: torch indexing)
        self.logits_hook = logits_hook  # (layer, logits [B, H, T]) -> logits; benchmarks force decisions with it
        self.bytes_read = 0

    def attend(self, layer, q, k, v, logits):
        c = self.cache
        lists = c.lists(layer, self.slots)  # [B, H]
        b, h, t, _ = k.shape
        new_evict = torch.zeros((b, h, t), dtype=torch.bool, device=k.device)
        if logits is not None:
            if self.logits_hook is not None:
                logits = self.logits_hook(layer, logits)
            a = torch.arange(t, device=k.device)
            nxt = torch.zeros_like(new_evict)
            nxt[..., :-1] = logits[..., 1:] > 0
            new_evict = nxt & (a[None, None, :] + 1 < self.n_new[:, None, None])  # the last new key: keep
            c.record_previous_decision(lists, self.starts, logits[..., 0] > 0)
        kept = c.kept_len[lists]
        out = self.attention(q, k, v, new_evict, self.n_new, self.starts, c.k_pool, c.v_pool,
                             c.page_table[lists], kept, c.ring_evict[lists], c.w, c.R)
        held = torch.clamp(self.starts, max=c.w)[:, None] + kept
        self.bytes_read += int(held.sum()) * c.token_bytes
        c.store(lists, self.starts, self.n_new, k, v, new_evict, mover=self.store)
        return out
