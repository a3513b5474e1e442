"""A dense KV cache in which slot ``j`` of a row holds position ``j``, plus each key's decision."""

from __future__ import annotations

import torch

from dms_kernels import reference as ref

from ..config import ModelConfig


class DenseDMSCache:
    """Per layer: ``k``/``v`` ``[B, Hkv, S, D]``; ``decisions`` ``[L, B, Hkv, S]`` bool; ``lengths`` ``[B]``.

    Nothing is ever freed: eviction is applied as visibility (the definition), and the count a
    compacted cache would hold is computed by :meth:`live_tokens`.
    """

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, dtype: torch.dtype, device):
        shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.cfg = cfg
        self.capacity = capacity
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.decisions = torch.zeros((cfg.num_layers, batch, cfg.num_kv_heads, capacity), dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)
        self.window = cfg.dms.window_size if cfg.dms_active else 1

    def step(self, positions: torch.Tensor, valid: torch.Tensor) -> "DenseCacheStep":
        """An attention backend for one forward pass of new tokens at ``positions`` ``[B, T]``;
        ``valid`` ``[B, T]`` marks real tokens (padding and finished rows write nothing)."""
        return DenseCacheStep(self, positions, valid)

    def advance(self, valid: torch.Tensor) -> None:
        self.lengths += valid.sum(-1)

    def live_tokens(self) -> torch.Tensor:
        """int64 ``[B, L, Hkv]``: the tokens a compacted cache must hold now (semantics §3)."""
        b = self.lengths.shape[0]
        out = torch.zeros((b, self.cfg.num_layers, self.cfg.num_kv_heads), dtype=torch.int64)
        for i in range(b):
            n = int(self.lengths[i])
            if not self.cfg.dms_active:
                out[i] = n
                continue
            for layer in range(self.cfg.num_layers):
                out[i, layer] = ref.live_tokens(self.decisions[layer, i : i + 1].cpu(), self.window, n - 1)[0]
        return out


class DenseCacheStep:
    def __init__(self, cache: DenseDMSCache, positions: torch.Tensor, valid: torch.Tensor):
        self.cache = cache
        self.positions = positions
        self.valid = valid
        rows, cols = valid.nonzero(as_tuple=True)
        self.rows, self.cols = rows, cols
        self.slots = positions[rows, cols]
        self.kv_lengths = cache.lengths + valid.sum(-1)

    def attend(self, layer, q, k, v, logits):
        c = self.cache
        rows, cols, slots = self.rows, self.cols, self.slots
        c.k[layer][rows, :, slots] = k[rows, :, cols]
        c.v[layer][rows, :, slots] = v[rows, :, cols]
        dec = c.decisions[layer]
        dec[rows, :, slots] = False  # a new key's decision is not known yet
        if logits is not None:
            # Shift by one: the logit at position p decides key p - 1.
            has_prev = slots >= 1
            r, s, cl = rows[has_prev], slots[has_prev], cols[has_prev]
            dec[r, :, s - 1] = logits[r, :, cl] > 0
        return ref.dms_attention_cached(q, c.k[layer], c.v[layer], dec, c.window, self.positions, self.kv_lengths)
