"""Model and DMS settings: defined, validated and documented in one place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from . import validation as V

# Keys released DMS checkpoints put in config.json, with our defaults.
DMS_KEYS = {
    "dms_window_size": ("window_size", 256),
    "dms_alpha_scale": ("alpha_scale", 100.0),
    "dms_initial_alpha_offset": ("initial_alpha_offset", 5.0),
    "dms_cr": ("cr", None),
    "dms_separate_alpha": ("separate_alpha", False),
    "dms_alpha_per": ("alpha_per", "head"),
    "dms_tau": ("tau", 0.1),
    "dms_disable_eviction": ("disable_eviction", False),
    "dms_sink_tokens": ("sink_tokens", 0),  # ours: 0 in released checkpoints (plain DMS)
    "dms_lora_rank": ("lora_rank", 0),  # ours: a low-rank update of the base, active with DMS (models/lora.py)
    "dms_lora_alpha": ("lora_alpha", 16.0),
    "dms_lora_targets": ("lora_targets", None),
}

# the projections a LoRA retrofit may update (dms_lora_targets), in their order in a layer
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(slots=True)
class DMSConfig:
    """How a model decides and delays eviction (see the semantics document).

    window_size: the delay window ``w``: an evicted key stays visible to queries ``j .. j + w``.
    alpha_scale / initial_alpha_offset: ``logit = scale * raw - offset``.
    cr: the compression ratio the checkpoint was trained for (informational).
    separate_alpha: False = borrowed neuron (last q channel of each group's first head);
        True = a small adapter (own RMSNorm + Linear H -> Hkv) on the residual stream.
    alpha_per: "head" (each KV head decides) or "layer" (KV head 0 decides for all).
    tau: Gumbel-sigmoid temperature used in training.
    disable_eviction: behave as the vanilla model.
    sink_tokens: the first ``n`` keys of every sequence are never evicted (their decisions forced
        to keep; ``dms_kernels.reference.sink_mask``). 0, plain DMS, is the default and what
        released checkpoints assume; an extension of the semantics document.
    lora_rank / lora_alpha / lora_targets: a low-rank update ``(alpha / rank) * B A`` of the named
        base projections (:data:`LORA_TARGETS`; default all), trained with the adapter and applied
        only while eviction is on, so ``disable_eviction`` is exactly the base model
        (``models/lora.py``). Rank 0, the default, is none. Ours, like ``sink_tokens``.
    """

    window_size: int = 256
    alpha_scale: float = 100.0
    initial_alpha_offset: float = 5.0
    cr: float | None = None
    separate_alpha: bool = False
    alpha_per: str = "head"
    tau: float = 0.1
    disable_eviction: bool = False
    sink_tokens: int = 0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] | None = None  # None: all of LORA_TARGETS
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Types, finiteness and ranges of every field (a NaN scale or a "no" would silently turn
        eviction off); run again wherever the settings are consumed."""
        self.window_size = V.integer("dms_window_size", self.window_size, 1, V.MAX_WINDOW)
        self.alpha_scale = V.number("dms_alpha_scale", self.alpha_scale, 0, lo_open=True)
        self.initial_alpha_offset = V.number("dms_initial_alpha_offset", self.initial_alpha_offset)
        if self.cr is not None:
            self.cr = V.number("dms_cr", self.cr, 1)
        V.boolean("dms_separate_alpha", self.separate_alpha)
        V.choice("dms_alpha_per", self.alpha_per, ("head", "layer"))
        self.tau = V.number("dms_tau", self.tau, 0, lo_open=True)
        V.boolean("dms_disable_eviction", self.disable_eviction)
        self.sink_tokens = V.integer("dms_sink_tokens", self.sink_tokens, 0, V.MAX_WINDOW)
        self.lora_rank = V.integer("dms_lora_rank", self.lora_rank, 0, 4096)
        self.lora_alpha = V.number("dms_lora_alpha", self.lora_alpha, 0, lo_open=True)
        targets = LORA_TARGETS if self.lora_targets is None else self.lora_targets
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)):
            raise V.SettingTypeError(f"dms_lora_targets: expected a list of projection names from {list(LORA_TARGETS)}, "
                                     f"got {targets!r}")
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets or len(set(targets)) != len(targets):
            raise ValueError(f"dms_lora_targets: expected distinct names from {list(LORA_TARGETS)}, got {list(targets)}")
        self.lora_targets = tuple(t for t in LORA_TARGETS if t in targets)
        if not isinstance(self.extra, dict):
            raise V.SettingTypeError(f"extra: expected a dict of unknown dms_* keys, got {type(self.extra).__name__}")

    @property
    def evicts(self) -> bool:
        return not self.disable_eviction

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], where: str = "config.json") -> "DMSConfig | None":
        """Read the ``dms_*`` keys of a config.json; None when there are none (a vanilla model).

        Unknown ``dms_*`` keys (block size, chunked prefill, preallocation, ...) are kept in
        ``extra`` and otherwise ignored. A wrong value is an error naming ``where`` and the key.
        """
        present = {k: v for k, v in raw.items() if k.startswith("dms_")}
        if not present:
            return None
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in present.items():
            if key in DMS_KEYS:
                if value is not None:
                    kwargs[DMS_KEYS[key][0]] = value
            else:
                extra[key] = value
        if "window_size" in kwargs:
            ws = kwargs["window_size"]
            if isinstance(ws, float) and ws.is_integer():
                kwargs["window_size"] = int(ws)
        try:
            return cls(extra=extra, **kwargs)
        except V.SettingTypeError as e:
            raise V.SettingTypeError(f"{where}: {e}") from None
        except ValueError as e:
            raise V.UserError(f"{where}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        out = {hf: getattr(self, ours) for hf, (ours, _) in DMS_KEYS.items()
               if self.lora_rank or not hf.startswith("dms_lora_")}  # a model without LoRA: the keys as before
        if self.lora_rank:
            out["dms_lora_targets"] = list(self.lora_targets)
        out.update(self.extra)
        return out

    def replace(self, **changes) -> "DMSConfig":
        return dataclasses.replace(self, **changes)


@dataclass(slots=True)
class ModelConfig:
    """The architecture of a Llama-family decoder (Llama 3.x, Qwen2/2.5, Qwen3)."""

    arch: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None, or {"rope_type": "linear" | "llama3", ...}
    attention_bias: bool  # q/k/v projections have a bias (always for Qwen2)
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dms: DMSConfig | None = None

    def __post_init__(self):
        hf_names = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                    "num_kv_heads": "num_key_value_heads"}  # the config.json keys
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            setattr(self, name, V.integer(hf_names.get(name, name), getattr(self, name), 1))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        self.rms_norm_eps = V.number("rms_norm_eps", self.rms_norm_eps, 0, lo_open=True)
        self.rope_theta = V.number("rope_theta", self.rope_theta, 0, lo_open=True)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def dms_active(self) -> bool:
        return self.dms is not None and self.dms.evicts
