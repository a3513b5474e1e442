"""Load a Llama-family checkpoint (config.json + safetensors, sharded or not) from a local folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..config import DMSConfig, ModelConfig
from ..validation import UserError
from .decoder import DecoderLM
from .layers import rope_inv_freq
from .lora import is_lora_parameter, refuse_merged
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
    return read_json(cfg)


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from a file; a broken or non-object file is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        raw = json.loads(path.read_text())
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def open_safetensors(path: Path):
    """``safe_open`` with the file named in the error when it is not a readable safetensors file."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def read_tensor(f, path: Path, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: tensor {name!r} cannot be read; the file is corrupt or truncated ({e})") from None


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors shards of a folder: ``model.safetensors`` or those of its index."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: expected a \"weight_map\" object of tensor name -> shard file")
        shards = sorted(set(weight_map.values()))
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


def resolve_dms(raw: dict[str, Any], dms: DMSConfig | dict[str, Any] | None,
                where: str = "config.json") -> DMSConfig | None:
    """The checkpoint's DMS settings, overridden by ``dms`` (a DMSConfig, or a dict of ``dms_*`` keys
    or DMSConfig field names)."""
    base = DMSConfig.from_hf_dict(raw, where=where)
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


def read_state(files: list[Path], model: DecoderLM, read, arch: str, *, dtype, device,
               whose: str = "the config") -> dict[str, torch.Tensor]:
    """The checkpoint tensors ``model`` (on the meta device) expects, read with
    ``read(f, path, name)`` from ``files`` (whole, or a rank's slice), shapes checked; the file is
    named in every error."""
    expected = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for path in files:
        with open_safetensors(path) as f:
            for name in f.keys():
                if name.endswith(_IGNORED_WEIGHTS):
                    continue
                if name not in expected:
                    unexpected.append(name)
                    continue
                t = read(f, path, name)
                if tuple(t.shape) != tuple(expected[name].shape):
                    raise ValueError(f"{path}: weight {name!r} has shape {tuple(t.shape)}, {whose} implies "
                                     f"{tuple(expected[name].shape)}")
                state[name] = t.to(device=device, dtype=dtype)
    if unexpected:
        raise ValueError(f"model_path: weights not used by a {arch} model: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    return state


def load_model(
    folder: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    dms: DMSConfig | dict[str, Any] | None = None,
) -> tuple[DecoderLM, dict[str, Any]]:
    folder = Path(folder)
    raw = read_config(folder)
    where = str(folder / "config.json")
    cfg = model_config_from_hf(raw, resolve_dms(raw, dms, where), where=where)
    files = weight_files(folder)
    with torch.device("meta"):
        model = DecoderLM(cfg)
    state = read_state(files, model, read_tensor, cfg.arch, dtype=dtype, device=device)
    model.load_state_dict(state, strict=False, assign=True)
    _materialise_rest(model, cfg, state, dtype, device)
    model.eval()
    return model, raw


def _materialise_rest(model: DecoderLM, cfg: ModelConfig, state, dtype, device) -> None:
    """Tie embeddings, initialise DMS adapters absent from the checkpoint, rebuild buffers."""
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing, fresh_lora = [], {}
    for name, p in list(model.named_parameters()):
        if not p.is_meta:
            continue
        module_name, _, attr = name.rpartition(".")
        if ".dms_proj_alpha" in name:
            init = torch.ones if name.endswith("dms_proj_alpha_norm.weight") else torch.zeros
            setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(init(p.shape, dtype=dtype, device=device)))
        elif is_lora_parameter(name):  # a LoRA update the checkpoint lacks: a fresh one (B A = 0)
            setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device)))
            fresh_lora.setdefault(module_name, []).append(name)
        else:
            missing.append(name)
    for module_name, names in fresh_lora.items():
        if len(names) == 2:
            model.get_submodule(module_name).reset_lora()
        else:  # half an update: A without B or B without A
            missing += names
    if missing:
        raise ValueError(f"model_path: weights missing from the checkpoint: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    model.model.rotary_emb.inv_freq = rope_inv_freq(cfg).to(device)


def load_named_weights(model: DecoderLM, path: str | Path, what: str = "weights") -> None:
    """Copy the tensors of a safetensors file into the model's parameters of the same names
    (a retrofit's DMS weights, a checkpoint); names the model lacks are an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    refuse_merged(model, what, "load weights into it")
    with open_safetensors(path) as f:
        weights = {n: read_tensor(f, path, n) for n in f.keys()}
    params = dict(model.named_parameters())
    unknown = [n for n in weights if n not in params]
    if unknown:
        raise ValueError(f"{what}: {path} holds weights this model does not have: {unknown[:4]}")
    wrong = [(n, tuple(w.shape), tuple(params[n].shape)) for n, w in weights.items() if w.shape != params[n].shape]
    if wrong:
        n, got, want = wrong[0]
        raise ValueError(f"{what}: {path}: weight {n!r} has shape {got}, this model's is {want}")
    bad = [n for n, w in weights.items() if w.is_floating_point() and not bool(torch.isfinite(w).all())]
    if bad:
        raise ValueError(f"{what}: {path}: weight {bad[0]!r} holds non-finite values")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w.to(params[n].dtype))
