"""What a generation call reports: tokens, speed, and the KV cache DMS lets it hold."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .config import ModelConfig


@dataclass(slots=True)
class KVFootprint:
    """Live vs dense KV tokens and bytes. ``live_per_layer_head`` is ``[L][Hkv]``, summed over sequences."""

    live_per_layer_head: list[list[int]]
    live_tokens: int  # sum over layers, KV heads, sequences
    dense_tokens: int  # what a dense cache holds for the same positions
    live_bytes: int  # bytes a compacted cache holds (K and V)
    dense_bytes: int
    compression_ratio: float  # dense / live

    @classmethod
    def from_live(cls, cfg: ModelConfig, live: torch.Tensor, lengths: list[int], elem_bytes: int) -> "KVFootprint":
        """live: int ``[B, L, Hkv]``; lengths: the positions each sequence's cache covers."""
        per_token = 2 * cfg.head_dim * elem_bytes
        live_total = int(live.sum())
        dense_total = cfg.num_layers * cfg.num_kv_heads * int(sum(lengths))
        return cls(
            live_per_layer_head=live.sum(0).tolist(),
            live_tokens=live_total,
            dense_tokens=dense_total,
            live_bytes=live_total * per_token,
            dense_bytes=dense_total * per_token,
            compression_ratio=(dense_total / live_total) if live_total else 1.0,
        )


@dataclass(slots=True)
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    elapsed_s: float
    prefill_s: float
    decode_s: float
    tokens_per_s: float  # generated tokens / elapsed
    decode_tokens_per_s: float
    kv: KVFootprint
    eviction: bool  # whether the model evicts (a DMS model with eviction on)
    window: int | None
    backend: str = "oracle"
    kernels: dict = field(default_factory=dict)  # op -> implementation that ran it (paged runtime)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        kv = self.kv
        mode = f"DMS eviction on (window {self.window})" if self.eviction else "eviction off (vanilla)"
        if self.eviction and self.extra.get("defer_budget"):
            mode += f", deferred to {self.extra['defer_budget']} tokens per layer and KV head"
        return (
            f"[stats] backend={self.backend} {mode} | prompt {self.prompt_tokens} tok, generated "
            f"{self.generated_tokens} tok in {self.elapsed_s:.2f} s ({self.tokens_per_s:.1f} tok/s, decode "
            f"{self.decode_tokens_per_s:.1f} tok/s) | KV live {kv.live_tokens} / dense {kv.dense_tokens} tokens, "
            f"{kv.live_bytes / 2**20:.2f} MiB / {kv.dense_bytes / 2**20:.2f} MiB, compression {kv.compression_ratio:.2f}x"
        )
