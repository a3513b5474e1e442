"""Load a Llama-family checkpoint (config.json + safetensors, sharded or not) from a local folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..config import DMSConfig, ModelConfig
from .decoder import DecoderLM
from .layers import rope_inv_freq
from .registry import model_config_from_hf

_IGNORED_WEIGHTS = ("rotary_emb.inv_freq",)


def read_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"model_path: folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"model_path: {str(folder)!r} is not a folder")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"model_path: {str(cfg)!r} is missing (a model folder needs config.json + safetensors)")
    with open(cfg) as f:
        return json.load(f)


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors shards of a folder: ``model.safetensors`` or those of its index."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"model_path: shards listed in {index.name} are missing: {missing}")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if found:
        return [folder / p for p in found]
    raise FileNotFoundError(
        f"model_path: no weights in {str(folder)!r} (expected model.safetensors or model.safetensors.index.json)"
    )


def resolve_dms(raw: dict[str, Any], dms: DMSConfig | dict[str, Any] | None) -> DMSConfig | None:
    """The checkpoint's DMS settings, overridden by ``dms`` (a DMSConfig, or a dict of ``dms_*`` keys
    or DMSConfig field names)."""
    base = DMSConfig.from_hf_dict(raw)
    if dms is None:
        return base
    if isinstance(dms, DMSConfig):
        return dms
    if not isinstance(dms, dict):
        raise ValueError(f"dms: expected a DMSConfig or a dict, got {type(dms).__name__}")
    fields = {f for f in DMSConfig.__dataclass_fields__ if f != "extra"}
    changes: dict[str, Any] = {}
    for key, value in dms.items():
        name = key[4:] if key.startswith("dms_") else key
        name = {"initial_alpha_offset": "initial_alpha_offset"}.get(name, name)
        if name not in fields:
            raise ValueError(f"dms: unknown setting {key!r}; known: {sorted(fields)}")
        changes[name] = value
    return (base or DMSConfig()).replace(**changes)


def load_model(
    folder: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    dms: DMSConfig | dict[str, Any] | None = None,
) -> tuple[DecoderLM, dict[str, Any]]:
    folder = Path(folder)
    raw = read_config(folder)
    cfg = model_config_from_hf(raw, resolve_dms(raw, dms), where=str(folder / "config.json"))
    files = weight_files(folder)
    with torch.device("meta"):
        model = DecoderLM(cfg)
    expected = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_WEIGHTS):
                    continue
                if name not in expected:
                    unexpected.append(name)
                    continue
                t = f.get_tensor(name)
                if tuple(t.shape) != tuple(expected[name].shape):
                    raise ValueError(
                        f"{path.name}: weight {name!r} has shape {tuple(t.shape)}, the config implies {tuple(expected[name].shape)}"
                    )
                state[name] = t.to(device=device, dtype=dtype)
    if unexpected:
        raise ValueError(f"model_path: weights not used by a {cfg.arch} model: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    model.load_state_dict(state, strict=False, assign=True)
    _materialise_rest(model, cfg, state, dtype, device)
    model.eval()
    return model, raw


def _materialise_rest(model: DecoderLM, cfg: ModelConfig, state, dtype, device) -> None:
    """Tie embeddings, initialise DMS adapters absent from the checkpoint, rebuild buffers."""
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = []
    for name, p in list(model.named_parameters()):
        if not p.is_meta:
            continue
        if ".dms_proj_alpha" in name:
            init = torch.ones if name.endswith("dms_proj_alpha_norm.weight") else torch.zeros
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(init(p.shape, dtype=dtype, device=device)))
        else:
            missing.append(name)
    if missing:
        raise ValueError(f"model_path: weights missing from the checkpoint: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    model.model.rotary_emb.inv_freq = rope_inv_freq(cfg).to(device)


def load_named_weights(model: DecoderLM, path: str | Path, what: str = "weights") -> None:
    """Copy the tensors of a safetensors file into the model's parameters of the same names
    (a retrofit's DMS weights, a checkpoint); names the model lacks are an error."""
    from safetensors.torch import load_file

    weights = load_file(str(path))
    params = dict(model.named_parameters())
    unknown = [n for n in weights if n not in params]
    if unknown:
        raise ValueError(f"{what}: {Path(path).name} holds weights this model does not have: {unknown[:4]}")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w.to(params[n].dtype))
