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
                 attention: Callable, logits_hook: Callable | None = None, store: Callable | None = None,
                 project_fn: Callable | None = None):
        self.cache = cache
        self.slots, self.starts, self.n_new = slots, starts, n_new
        self.attention = attention
        self.store = store  # the backend's store mover (None: torch indexing)
        self.project_fn = project_fn  # the backend's fused projection epilogue (None: torch ops)
        self._recorded: set[int] = set()  # layers whose previous decision the fused kernel recorded
        self.logits_hook = logits_hook  # (layer, logits [B, H, T]) -> logits; benchmarks force decisions with it
        self._tokens_read = torch.zeros((), dtype=torch.int64, device=cache.device)

    @property
    def bytes_read(self) -> int:
        """K/V bytes attention read from the cache in this step (one host sync)."""
        return int(self._tokens_read) * self.cache.token_bytes

    def project(self, attn, q_lin, k_lin, h_pre, cos, sin):
        """q/k norm, eviction logits, zeroing, RoPE and the previous key's decision in one kernel;
        None where the torch path must run (no kernel, forced logits, per-layer decisions)."""
        cfg = attn.cfg
        if self.project_fn is None or self.logits_hook is not None:
            return None
        if cfg.dms_active and cfg.dms.alpha_per == "layer":
            return None
        c, dms = self.cache, cfg.dms
        variant, adapter = "none", None
        if cfg.dms_active:
            variant = "adapter" if dms.separate_alpha else "borrowed"
            if dms.separate_alpha:
                adapter = attn.adapter_logits(h_pre)
        q, k, logits = self.project_fn(
            q_lin, k_lin, cos, sin, attn.q_norm.weight if cfg.qk_norm else None,
            attn.k_norm.weight if cfg.qk_norm else None, adapter, c.ring_evict, c.lists(attn.layer, self.slots),
            self.starts, self.n_new, cfg.num_kv_heads, variant, cfg.rms_norm_eps,
            dms.alpha_scale if dms else 1.0, dms.initial_alpha_offset if dms else 0.0)
        self._recorded.add(attn.layer)
        return q, k, (logits if cfg.dms_active else None)

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
            if layer not in self._recorded:  # the fused kernel already did it
                c.record_previous_decision(lists, self.starts, logits[..., 0] > 0)
        kept = c.kept_len[lists]
        out = self.attention(q, k, v, new_evict, self.n_new, self.starts, c.k_pool, c.v_pool,
                             c.page_table[lists], kept, c.ring_evict[lists], c.w, c.R)
        held = torch.clamp(self.starts, max=c.w)[:, None] + kept
        self._tokens_read += held.sum()  # stays on the device: read once per step, not per layer
        c.store(lists, self.starts, self.n_new, k, v, new_evict, mover=self.store)
        return out
