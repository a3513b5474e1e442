"""Shared fixtures: tiny random checkpoints saved to disk in Hugging Face format."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter (set before any kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY = dict(vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)


def save_tiny(folder: Path, arch: str, seed: int = 0, shard: bool = False, extra_config: dict | None = None, **overrides):
    """Initialise a tiny transformers model of ``arch`` and save it (config.json + safetensors)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    cfg_cls, model_cls = classes[arch]
    kwargs = {**TINY, **overrides}
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kwargs)).eval()
    with torch.no_grad():  # untrained norms are all ones; perturb them so norms are exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(folder), max_shard_size="40KB" if shard else "5GB")
    if extra_config:
        path = folder / "config.json"
        raw = json.loads(path.read_text())
        raw.update(extra_config)
        path.write_text(json.dumps(raw, indent=2))
    return model


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    cache: dict = {}

    def make(arch: str = "llama", seed: int = 0, shard: bool = False, extra_config: dict | None = None, **overrides):
        key = json.dumps([arch, seed, shard, extra_config, overrides], sort_keys=True, default=str)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            model = save_tiny(folder, arch, seed, shard, extra_config, **overrides)
            cache[key] = (folder, model)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def smollm2_folder():
    """The embedded SmolLM2-135M-Instruct, converted once to a safetensors folder."""
    from dms_runtime.hub import resolve

    folder, _ = resolve("smollm2-135m-instruct")
    return folder


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    # Fresh random inputs every run, but reproducible from the printed seed on failure.
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("torch_seed", seed))
    yield


@pytest.fixture(scope="session")
def tiny_with_tokenizer(smollm2_folder, tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer and chat template (vocab 49152)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-tok")
    save_tiny(folder, "llama", vocab_size=49152, hidden_size=32, intermediate_size=48,
              num_attention_heads=4, num_key_value_heads=2, eos_token_id=2, bos_token_id=1)
    AutoTokenizer.from_pretrained(str(smollm2_folder)).save_pretrained(str(folder))
    return folder
