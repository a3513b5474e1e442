"""Our models give transformers' logits on tiny random checkpoints saved to disk."""

import pytest
import torch

from dms_runtime.models.full_sequence import FullSequenceAttention
from dms_runtime.models import load_model

CASES = {
    "llama": dict(arch="llama"),
    "llama-mha-tied": dict(arch="llama", num_key_value_heads=8, tie_word_embeddings=True),
    "llama-bias": dict(arch="llama", attention_bias=True, mlp_bias=True),
    "llama3-rope": dict(arch="llama", rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 64}),
    "llama-linear-rope": dict(arch="llama", rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "llama-sharded": dict(arch="llama", shard=True),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3", head_dim=16),
    "qwen3-gqa8": dict(arch="qwen3", num_attention_heads=8, num_key_value_heads=1, head_dim=32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tiny_factory, case):
    folder, hf = tiny_factory(**CASES[case])
    if CASES[case].get("shard"):
        assert (folder / "model.safetensors.index.json").is_file()
    ours, _ = load_model(folder)
    ids = torch.randint(0, hf.config.vocab_size, (3, 37))
    pos = torch.arange(37).expand(3, 37)
    with torch.no_grad():
        mine = ours(ids, pos, FullSequenceAttention())
        theirs = hf(ids).logits
    assert torch.isfinite(mine).all()
    assert (mine - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_right_padded_batch_equals_rows_alone(tiny_factory, arch):
    folder, _ = tiny_factory(arch=arch, extra_config={"dms_window_size": 3, "dms_initial_alpha_offset": 0.0})
    model, _ = load_model(folder)
    lengths = torch.tensor([9, 1, 14])
    ids = torch.randint(0, 131, (3, 14))
    pos = torch.arange(14).expand(3, 14)
    with torch.no_grad():
        batched = model(ids, pos, FullSequenceAttention(3, lengths=lengths))
        for i, n in enumerate(lengths.tolist()):
            alone = model(ids[i : i + 1, :n], pos[i : i + 1, :n], FullSequenceAttention(3))
            torch.testing.assert_close(batched[i, :n], alone[0], rtol=1e-5, atol=1e-5)
