"""Self-attention of a Llama-family layer with the DMS eviction logit.

The layer projects, normalises and rotates q/k, computes the eviction logits, and hands
``q, k, v, logits`` to an attention backend, which owns the KV cache (or its absence)
and applies the delayed-eviction visibility.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from dms_kernels import reference as ref

from ..config import ModelConfig
from .layers import RMSNorm, apply_rotary
from .lora import projection


class AttentionBackend(Protocol):
    """Where attention is computed. One object per forward pass (or per decode step).

    A backend may also define ``project(attn, q_lin, k_lin, h_pre, cos, sin, sinks) -> (q, k, logits)``
    to run the projection epilogue on its own kernels (the paged runtime's step does), attention
    sinks kept as in :meth:`DMSAttention._project`; a backend without one gets that method (torch ops).
    """

    def attend(
        self,
        layer: int,
        q: torch.Tensor,  # [B, Hq, T, D], post-RoPE, borrowed channel zeroed
        k: torch.Tensor,  # [B, Hkv, T, D], post-RoPE
        v: torch.Tensor,  # [B, Hkv, T, D]
        logits: torch.Tensor | None,  # [B, Hkv, T] float32 eviction logits; None when eviction is off
    ) -> torch.Tensor:  # [B, Hq, T, D]
        ...


class DMSAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = projection(cfg, layer, "q_proj", h, cfg.num_heads * d, cfg.attention_bias)
        self.k_proj = projection(cfg, layer, "k_proj", h, cfg.num_kv_heads * d, cfg.attention_bias)
        self.v_proj = projection(cfg, layer, "v_proj", h, cfg.num_kv_heads * d, cfg.attention_bias)
        self.o_proj = projection(cfg, layer, "o_proj", cfg.num_heads * d, h, cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        if cfg.dms is not None and cfg.dms.separate_alpha:
            # The adapter starts at zero: every logit is -offset, nothing is evicted early.
            self.dms_proj_alpha = nn.Linear(h, cfg.num_kv_heads, bias=cfg.attention_bias)
            self.dms_proj_alpha_norm = RMSNorm(h, cfg.rms_norm_eps)
            nn.init.zeros_(self.dms_proj_alpha.weight)
            if self.dms_proj_alpha.bias is not None:
                nn.init.zeros_(self.dms_proj_alpha.bias)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, H], after the input norm
        h_pre: torch.Tensor,  # [B, T, H], residual stream before the input norm
        cos: torch.Tensor,
        sin: torch.Tensor,
        backend: AttentionBackend,
        sinks: torch.Tensor | None = None,  # [B, 1, T] bool: logits that decide a sink (DMSConfig.sink_tokens)
    ) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        q_lin, k_lin = self.q_proj(x), self.k_proj(x)  # [B, T, Hq*D], [B, T, Hkv*D]
        v = self.v_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        project = getattr(backend, "project", None)
        if project is not None:  # the backend's kernels: norms, logits, sinks, zeroing, RoPE
            q, k, logits = project(self, q_lin, k_lin, h_pre, cos, sin, sinks)
        else:
            q, k, logits = self._project(q_lin, k_lin, h_pre, cos, sin, sinks)
        out = backend.attend(self.layer, q, k, v, logits)  # [B, Hq, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, cfg.num_heads * cfg.head_dim))

    def adapter_logits(self, h_pre: torch.Tensor) -> torch.Tensor:
        """The adapter variant's eviction logits ``[B, Hkv, T]`` (float32) from the residual stream."""
        dms = self.cfg.dms
        return ref.adapter_eviction_logits(
            h_pre,
            self.dms_proj_alpha_norm.weight,
            self.dms_proj_alpha.weight,
            self.dms_proj_alpha.bias,
            eps=self.dms_proj_alpha_norm.eps,
            scale=dms.alpha_scale,
            offset=dms.initial_alpha_offset,
        )

    def _project(self, q_lin, k_lin, h_pre, cos, sin, sinks=None):
        """q/k norm, eviction logits (``sinks``: reference.keep_sinks, its mask checked once per step),
        borrowed-channel zeroing and RoPE in torch ops."""
        cfg = self.cfg
        b, t, _ = q_lin.shape
        q = q_lin.view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = k_lin.view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)

        logits = None
        borrowed = False
        if cfg.dms_active:
            dms = cfg.dms
            if dms.separate_alpha:
                logits = self.adapter_logits(h_pre)
            else:
                logits = ref.eviction_logits(q, cfg.num_kv_heads, dms.alpha_scale, dms.initial_alpha_offset)
                q = ref.zero_borrowed_channel(q, cfg.num_kv_heads)  # before RoPE ...
                borrowed = True
            if dms.alpha_per == "layer":
                logits = logits[:, :1].expand_as(logits)
            if sinks is not None:
                logits = logits.masked_fill(sinks, ref.SINK_LOGIT)

        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if borrowed:
            q = ref.zero_borrowed_channel(q, cfg.num_kv_heads)  # ... and after (RoPE mixes D-1 with D/2-1)
        return q, k, logits
