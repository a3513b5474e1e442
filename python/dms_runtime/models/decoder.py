"""A Llama-family decoder (Llama 3.x, Qwen2/2.5, Qwen3) whose parameter names match
Hugging Face checkpoints, so safetensors load without renaming."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dms_kernels import reference as ref

from ..config import ModelConfig
from .attention import AttentionBackend, DMSAttention
from .layers import GatedMLP, RMSNorm, Rotary


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = DMSAttention(cfg, layer)
        self.mlp = GatedMLP(cfg, layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, backend, sinks=None):
        h = h + self.self_attn(self.input_layernorm(h), h, cos, sin, backend, sinks)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderBody(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = Rotary(cfg)


class DecoderLM(nn.Module):
    """``forward(input_ids [B, T], positions [B, T], backend) -> logits [B, T', V]``.

    ``checkpoint_layers``: when set and autograd is recording, each layer keeps only its input
    for the backward pass and runs again there (activation checkpointing): a training step's
    memory then grows with one layer's attention scores, not every layer's. The backend must give
    the same result when a layer runs twice (``TrainingAttention`` reuses its noise draw).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.checkpoint_layers = False
        self.model = DecoderBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T] int64
        positions: torch.Tensor,  # [B, T] int64, absolute positions
        backend: AttentionBackend,
        logits_index: torch.Tensor | None = None,  # [B] int64: compute logits at this column only
    ) -> torch.Tensor:  # [B, T, V], or [B, 1, V] with logits_index
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions, h.dtype)
        dms = self.config.dms
        # Planned once per step (checked here, not per layer): the positions whose logit decides a sink
        # (dms_sink_tokens), [B, 1, T] to broadcast over the KV heads, or None.
        sinks = None
        if self.config.dms_active and dms.sink_tokens:
            sinks = ref.sink_mask(positions, dms.sink_tokens)[:, None, :]
        recompute = self.checkpoint_layers and torch.is_grad_enabled()
        for layer in self.model.layers:
            if recompute:
                h = checkpoint(layer, h, cos, sin, backend, sinks, use_reentrant=False)
            else:
                h = layer(h, cos, sin, backend, sinks)
        if logits_index is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_index][:, None]
        return self.lm_head(self.model.norm(h))
