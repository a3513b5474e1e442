"""Cache-less attention over whole (right-padded) sequences, by the reference definition."""

from __future__ import annotations

import torch

from dms_kernels import reference as ref


class FullSequenceAttention:
    """Attention over the ``T`` positions of one forward pass, with no cache.

    window: the DMS delay window (ignored when the model passes no logits).
    lengths: ``[B]`` real lengths of right-padded rows; keys at or past them are never seen.
    record: keep each layer's decisions ``[B, Hkv, T]`` in ``self.decisions``.
    """

    def __init__(self, window: int | None = None, lengths: torch.Tensor | None = None, record: bool = False):
        self.window = window
        self.lengths = lengths
        self.decisions: dict[int, torch.Tensor] = {}
        self.record = record

    def attend(self, layer, q, k, v, logits):
        b, hkv, t, _ = k.shape
        if logits is None:
            decisions = torch.zeros((b, hkv, t), dtype=torch.bool, device=k.device)
            window = 1
        else:
            if self.window is None:
                raise ValueError("window: the model computes eviction logits, so a DMS window is required")
            decisions = ref.eviction_decisions(logits)
            window = self.window
            if self.lengths is not None:
                # The last real key's decision would come from a pad position: keep it.
                cols = torch.arange(t, device=k.device)
                decisions = decisions & (cols[None, None, :] < (self.lengths.to(k.device) - 1)[:, None, None])
        if self.record:
            self.decisions[layer] = decisions
        if self.lengths is None:
            return ref.dms_attention(q, k, v, decisions, window)
        positions = torch.arange(t, device=q.device).expand(b, t)
        return ref.dms_attention_cached(q, k, v, decisions, window, positions, self.lengths.to(q.device))
