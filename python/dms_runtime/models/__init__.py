"""Our compact Llama-family models (Llama 3.x, Qwen2/2.5, Qwen3) with DMS eviction logits."""

from .decoder import DecoderLM
from .loading import load_model
from .registry import supported

__all__ = ["DecoderLM", "load_model", "supported"]
