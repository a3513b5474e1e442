"""The embedded SmolLM2-135M-Instruct: offline load, logits and 64 greedy tokens equal transformers'."""

import time

import pytest
import torch

import dms_runtime as dr
from dms_runtime.models.full_sequence import FullSequenceAttention

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def both(smollm2_folder):
    from transformers import LlamaForCausalLM

    ours = dr.load("smollm2-135m-instruct")
    hf = LlamaForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32).eval()
    return ours, hf


def test_loads_offline_by_name_fast_once_converted(smollm2_folder):
    t = time.perf_counter()
    lm = dr.load("smollm2-135m-instruct")
    assert time.perf_counter() - t < 15  # a cached safetensors folder, no GGUF work
    cfg = lm.config
    assert (cfg.arch, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("llama", 30, 9, 3, 64)
    assert cfg.dms is None and lm.tokenizer.chat_template
    assert lm.path == smollm2_folder


def test_logits_equal_transformers(both):
    ours, hf = both
    text = ours.tokenizer.apply_chat_template([{"role": "user", "content": "Explain why the sky is blue."}],
                                              add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([ours.tokenizer(text, add_special_tokens=False)["input_ids"]])
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        mine = ours.model(ids, pos, FullSequenceAttention())
        theirs = hf(ids).logits
    assert (mine - theirs).abs().max().item() < 1e-3


def test_64_greedy_tokens_equal_transformers(both):
    ours, hf = both
    res = dr.generate(ours, ["Write a short story about a robot who learns to paint."], max_new_tokens=64,
                      ignore_eos=True)
    prompt = res.outputs[0].prompt_token_ids
    with torch.no_grad():
        ids = torch.tensor([prompt])  # the chat prompt holds token 2, so pass the mask explicitly
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                             eos_token_id=None, pad_token_id=2)[0, len(prompt):].tolist()
    assert len(res.token_ids[0]) == 64
    assert res.token_ids[0] == theirs


def test_chat_answer_is_sensible(both):
    ours, _ = both
    res = dr.generate(ours, ["What is the capital of France?"], max_new_tokens=24)
    assert "Paris" in res.texts[0]
    assert res.outputs[0].finish_reason == "eos"
