"""Registry of supported architectures: Hugging Face config -> our ModelConfig."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

try:  # what transformers' typed configs raise for a wrong-typed field
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # older huggingface_hub: the configs are not typed
    StrictDataclassError = ValueError

from ..config import DMSConfig, ModelConfig
from .. import validation as V
from ..validation import UserError


@dataclass(frozen=True, slots=True)
class ArchAdapter:
    arch: str  # our name
    hf_model_type: str  # transformers' config model_type
    qkv_bias: Callable[[dict[str, Any]], bool]
    qk_norm: bool


_ADAPTERS = {
    "llama": ArchAdapter("llama", "llama", lambda c: bool(c.get("attention_bias", False)), qk_norm=False),
    "qwen2": ArchAdapter("qwen2", "qwen2", lambda c: True, qk_norm=False),
    "qwen3": ArchAdapter("qwen3", "qwen3", lambda c: bool(c.get("attention_bias", False)), qk_norm=True),
}

# Architecture names found in config.json -> our adapter. DMS checkpoints name remote-code
# classes (``Qwen3ForCausalLMDMS``); we never run remote code and map them to our own model.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "LlamaForCausalLMDMS": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen2ForCausalLMDMS": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3ForCausalLMDMS": "qwen3",
}
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_dms": "qwen3", "qwen2_dms": "qwen2", "llama_dms": "llama"}


def supported() -> list[str]:
    return sorted(ARCHITECTURES)


def adapter_for(raw: dict[str, Any], where: str = "config.json") -> ArchAdapter:
    archs = raw.get("architectures") or []
    for name in archs:
        if name in ARCHITECTURES:
            return _ADAPTERS[ARCHITECTURES[name]]
    if not archs and raw.get("model_type") in MODEL_TYPES:
        return _ADAPTERS[MODEL_TYPES[raw["model_type"]]]
    shown = archs or raw.get("model_type")
    raise ValueError(
        f"{where}: unsupported architecture {shown!r}; supported: {', '.join(supported())}"
    )


def _rope(raw: dict[str, Any], hf_cfg) -> tuple[float, dict[str, Any] | None]:
    params = getattr(hf_cfg, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:  # older configs
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = dict(raw.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise ValueError(f"rope_scaling: rope type {kind!r} is not supported (supported: default, linear, llama3)")
    return theta, scaling


def hf_config_object(raw: dict[str, Any], adapter: ArchAdapter):
    """transformers' own config class for the architecture, built from the raw dict."""
    from transformers import CONFIG_MAPPING

    clean = {k: v for k, v in raw.items() if k not in ("auto_map", "architectures", "model_type") and not k.startswith("dms_")}
    return CONFIG_MAPPING[adapter.hf_model_type](**clean)


def model_config_from_hf(raw: dict[str, Any], dms: DMSConfig | None = None, where: str = "config.json") -> ModelConfig:
    try:
        return _model_config_from_hf(raw, dms, where)
    except (ValueError, TypeError, ArithmeticError, StrictDataclassError) as e:  # a wrong value in the file
        text = " ".join(str(e).split())
        raise UserError(text if text.startswith(where) else f"{where}: {text}") from None


def _model_config_from_hf(raw: dict[str, Any], dms: DMSConfig | None, where: str) -> ModelConfig:
    adapter = adapter_for(raw, where)
    hf = hf_config_object(raw, adapter)
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hf.hidden_act!r} is not supported (expected 'silu')")
    if getattr(hf, "use_sliding_window", False):
        raise ValueError(f"{where}: use_sliding_window=true is not supported")
    theta, scaling = _rope(raw, hf)
    heads = V.integer("num_attention_heads", hf.num_attention_heads, 1)
    kv_heads = V.integer("num_key_value_heads", getattr(hf, "num_key_value_heads", None) or heads, 1)
    if heads % kv_heads:
        raise ValueError(f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    eos = hf.eos_token_id if hasattr(hf, "eos_token_id") else None
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    if dms is None:
        dms = DMSConfig.from_hf_dict(raw)
    return ModelConfig(
        arch=adapter.arch,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.rms_norm_eps),
        max_position_embeddings=int(hf.max_position_embeddings),
        rope_theta=theta,
        rope_scaling=scaling,
        attention_bias=adapter.qkv_bias(raw),
        o_bias=adapter.arch != "qwen2" and bool(raw.get("attention_bias", False)),  # Qwen2: q/k/v only
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=adapter.qk_norm,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_ids=eos_ids,
        dms=dms,
    )
