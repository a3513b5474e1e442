"""Training-time DMS attention: the soft eviction bias with Gumbel-sigmoid noise (semantics §4)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from dms_kernels import reference as ref


class TrainingAttention:
    """Attention backend of a training forward over whole right-padded sequences.

    Per layer: logistic noise (one sample per batch, KV head, position), the score bias
    ``reference.training_bias`` (only the soft probabilities enter the mask), and the
    straight-through hard decisions kept in ``self.hard`` for the compression loss.
    lengths ``[B]``: real lengths; keys at or past them are masked.

    Each layer draws its noise once per forward: when activation checkpointing
    (``DecoderLM.checkpoint_layers``) runs a layer again in the backward pass, the second call
    reuses that draw and replaces the layer's hard decisions instead of adding a layer.
    """

    def __init__(self, window: int, tau: float, generator: torch.Generator | None = None,
                 lengths: torch.Tensor | None = None):
        self.window, self.tau = window, tau
        self.generator = generator
        self.lengths = lengths
        self._hard: dict[int, torch.Tensor] = {}  # layer -> [B, Hkv, T]
        self._noise: dict[int, torch.Tensor] = {}  # layer -> [B, Hkv, T]

    @property
    def hard(self) -> list[torch.Tensor]:
        """The hard decisions of each layer run so far, in layer order ([B, Hkv, T] each)."""
        return [self._hard[i] for i in sorted(self._hard)]

    def attend(self, layer, q, k, v, logits):
        b, hq, t, d = q.shape
        h = k.shape[1]
        if logits is None:
            raise ValueError("logits: training attention needs a model with DMS eviction on")
        noise = self._noise.get(layer)
        if noise is None:
            noise = self._noise[layer] = ref.logistic_noise(logits.shape, generator=self.generator,
                                                            device=logits.device)
        bias = ref.training_bias(logits, self.window, self.tau, noise)  # [B, H, T, T] float32
        if self.lengths is not None:
            pad = torch.arange(t, device=q.device)[None, :] >= self.lengths.to(q.device)[:, None]  # [B, T]
            bias = bias.masked_fill(pad[:, None, None, :], float("-inf"))
            bias = bias.masked_fill(pad[:, None, :, None], 0.0)  # padded query rows: anything finite
        hard = ref.hard_decisions(logits, self.tau, noise)
        if self.lengths is not None:
            hard = hard * (~pad)[:, None, :]
        self._hard[layer] = hard
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype).repeat_interleave(hq // h, 1),
                                              enable_gqa=hq > h)


@contextlib.contextmanager
def eviction_off(model):
    """The same weights with eviction off: the teacher of the distillation."""
    dms = model.config.dms
    if dms is None:
        yield model
        return
    before = dms.disable_eviction
    dms.disable_eviction = True
    try:
        yield model
    finally:
        dms.disable_eviction = before
