"""Attention backends: where ``q, k, v`` and the eviction logits of a layer meet a KV cache."""

from .full import FullSequenceAttention

__all__ = ["FullSequenceAttention"]
