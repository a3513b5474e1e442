"""Convert a GGUF file of a supported architecture into a safetensors model folder, once.

The GGUF tensors are dequantised through transformers' GGUF support (``gguf`` package),
written as float32 safetensors next to ``config.json`` and the tokenizer, in a cache folder
keyed by the file's name, size and modification time. Later loads read that folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from .models.registry import ARCHITECTURES
from .validation import UserError

# what the GGUF reader raises on a truncated or corrupt file (struct.error: a header cut short)
_UNREADABLE = (ValueError, KeyError, IndexError, EOFError, OSError, struct.error)


def cache_root() -> Path:
    root = os.environ.get("DMS_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "dms_runtime"


def converted_folder(gguf_path: str | Path) -> Path:
    p = Path(gguf_path).resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{p.stem}-{key}"


def convert_gguf(gguf_path: str | Path, *, force: bool = False) -> Path:
    """Return a safetensors folder for ``gguf_path``, converting it on first use."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"gguf_path: {str(gguf_path)!r} does not exist")
    out = converted_folder(gguf_path)
    if (out / "config.json").is_file() and not force:
        return out

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from safetensors.torch import save_file

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        hf_cfg = AutoConfig.from_pretrained(folder, gguf_file=name)
    except _UNREADABLE as e:
        raise UserError(f"gguf_path: cannot read {str(gguf_path)!r} as a GGUF file of a supported architecture; "
                        f"it may be truncated or corrupt ({type(e).__name__}: {e})") from None
    if hf_cfg.model_type not in ("llama", "qwen2", "qwen3"):
        raise ValueError(f"gguf_path: unsupported architecture {hf_cfg.model_type!r}; supported: llama, qwen2, qwen3")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_cfg)
    try:
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)
        tensors = {k: v.float().contiguous() for k, v in parsed["tensors"].items()}
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except _UNREADABLE as e:
        raise UserError(f"gguf_path: the tensors or tokenizer of {str(gguf_path)!r} cannot be read; the file may be "
                        f"truncated or corrupt ({type(e).__name__}: {e})") from None
    if hf_cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        raw = hf_cfg.to_dict()
        raw["architectures"] = [type(skeleton).__name__]
        raw["torch_dtype"] = "float32"
        raw.pop("_name_or_path", None)
        if raw["architectures"][0] not in ARCHITECTURES:
            raise ValueError(f"gguf_path: unsupported architecture {raw['architectures'][0]!r}")
        with open(tmp / "config.json", "w") as f:
            json.dump(raw, f, indent=2)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": name})
        tokenizer.save_pretrained(str(tmp))
        _publish(tmp, out, replace=force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _publish(tmp: Path, out: Path, *, replace: bool) -> None:
    """Move the finished conversion ``tmp`` to ``out`` in one rename, so that a reader never sees a
    partial folder. Another process may have converted the same file meanwhile: its folder stands
    (it may be in use) unless ``replace``, which first renames it aside."""
    if replace and out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=".old-"))
        os.replace(out, old / "converted")
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:
        if not (out / "config.json").is_file():
            raise
        # another process published the same conversion first: keep it, drop ours
