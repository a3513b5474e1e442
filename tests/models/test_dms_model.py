"""DMS inside the model: config keys, both logit variants, the borrowed channel, vanilla fallbacks."""

import json

import pytest
import torch

from dms_kernels import reference as ref
from dms_runtime.models.full_sequence import FullSequenceAttention
from dms_runtime.config import DMSConfig
from dms_runtime.models import load_model
from dms_runtime.models.layers import apply_rotary

DMS_KEYS = {
    "dms_window_size": 4, "dms_alpha_scale": 50.0, "dms_initial_alpha_offset": 1.0, "dms_cr": 8,
    "dms_separate_alpha": False, "dms_alpha_per": "head", "dms_tau": 0.2, "dms_disable_eviction": False,
    "dms_paged_attention_block_size": 256, "dms_chunked_prefill": 4096, "dms_preallocate_for_tokens": 2048,
}


class Spy:
    """A backend that records what each layer hands to attention, then defers to the definition."""

    def __init__(self, window):
        self.inner = FullSequenceAttention(window)
        self.seen = {}

    def attend(self, layer, q, k, v, logits):
        self.seen[layer] = (q, k, v, logits)
        return self.inner.attend(layer, q, k, v, logits)


def test_config_keys_of_released_checkpoints_are_read(tiny_factory):
    folder, _ = tiny_factory(arch="qwen3", extra_config=DMS_KEYS)
    model, _ = load_model(folder)
    dms = model.config.dms
    assert (dms.window_size, dms.alpha_scale, dms.initial_alpha_offset, dms.cr, dms.tau) == (4, 50.0, 1.0, 8, 0.2)
    assert not dms.separate_alpha and dms.alpha_per == "head" and model.config.dms_active
    assert dms.extra == {"dms_paged_attention_block_size": 256, "dms_chunked_prefill": 4096,
                         "dms_preallocate_for_tokens": 2048}


def test_remote_code_architecture_maps_to_our_qwen3(tiny_factory):
    extra = {**DMS_KEYS, "architectures": ["Qwen3ForCausalLMDMS"],
             "auto_map": {"AutoModelForCausalLM": "modeling_qwen3_dms.Qwen3ForCausalLMDMS"}}
    folder, _ = tiny_factory(arch="qwen3", extra_config=extra)
    model, _ = load_model(folder)
    assert model.config.arch == "qwen3" and model.config.qk_norm


def test_vanilla_checkpoint_loads_vanilla_and_takes_dms_settings_at_load(tiny_factory):
    folder, _ = tiny_factory(arch="llama")
    vanilla, _ = load_model(folder)
    assert vanilla.config.dms is None and not vanilla.config.dms_active
    dms, _ = load_model(folder, dms={"dms_window_size": 16})
    assert dms.config.dms.window_size == 16 and dms.config.dms_active
    dms2, _ = load_model(folder, dms=DMSConfig(window_size=2, separate_alpha=True))
    assert dms2.config.dms.separate_alpha


def test_borrowed_channel_zeroed_before_and_after_rope(tiny_factory):
    folder, _ = tiny_factory(arch="qwen3", head_dim=16, extra_config={"dms_window_size": 2})
    model, _ = load_model(folder)
    cfg = model.config
    captured = {}
    attn0 = model.model.layers[0].self_attn
    attn0.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    ids = torch.randint(0, 131, (2, 10))
    pos = torch.arange(10).expand(2, 10)
    spy = Spy(2)
    with torch.no_grad():
        model(ids, pos, spy)
        x = captured["x"]
        q = attn0.q_norm(attn0.q_proj(x).view(2, 10, cfg.num_heads, cfg.head_dim).transpose(1, 2))
        exp_logits = ref.eviction_logits(q, cfg.num_kv_heads, 100.0, 5.0)
        cos, sin = model.model.rotary_emb(pos, q.dtype)
        exp_q = ref.zero_borrowed_channel(apply_rotary(ref.zero_borrowed_channel(q, cfg.num_kv_heads), cos, sin), cfg.num_kv_heads)
        wrong_q = ref.zero_borrowed_channel(apply_rotary(q, cos, sin), cfg.num_kv_heads)  # zeroed after RoPE only
    got_q, got_k, _, got_logits = spy.seen[0]
    torch.testing.assert_close(got_logits, exp_logits)
    torch.testing.assert_close(got_q, exp_q)
    assert not torch.allclose(got_q, wrong_q)  # the pre-RoPE zeroing matters: RoPE mixes D-1 into D/2-1
    g = cfg.group_size
    assert torch.equal(got_q[:, ::g, :, -1], torch.zeros_like(got_q[:, ::g, :, -1]))
    others = [h for h in range(cfg.num_heads) if h % g]
    assert got_q[:, others, :, -1].abs().sum() > 0


def test_adapter_variant_reads_checkpoint_weights_and_starts_at_zero(tiny_factory, tmp_path):
    folder, _ = tiny_factory(arch="llama", extra_config={"dms_window_size": 2, "dms_separate_alpha": True})
    model, _ = load_model(folder)  # no adapter weights in the checkpoint: zero-initialised
    vanilla, _ = load_model(folder, dms={"dms_disable_eviction": True})
    ids = torch.randint(0, 131, (1, 12))
    pos = torch.arange(12)[None]
    spy = Spy(2)
    with torch.no_grad():
        out = model(ids, pos, spy)
        ref_out = vanilla(ids, pos, FullSequenceAttention())
    assert torch.equal(spy.seen[1][3], torch.full((1, 2, 12), -5.0))  # every logit is -offset
    torch.testing.assert_close(out, ref_out)  # nothing evicted and q is not zeroed in this variant

    # adapter weights stored under the released checkpoint names are loaded
    from safetensors.torch import load_file, save_file
    import shutil

    dst = tmp_path / "with-adapter"
    shutil.copytree(folder, dst)
    sd = load_file(str(dst / "model.safetensors"))
    for i in range(2):
        sd[f"model.layers.{i}.self_attn.dms_proj_alpha.weight"] = torch.randn(2, 64)
        sd[f"model.layers.{i}.self_attn.dms_proj_alpha_norm.weight"] = torch.rand(64) + 0.5
    save_file(sd, str(dst / "model.safetensors"))
    loaded, _ = load_model(dst)
    attn = loaded.model.layers[1].self_attn
    assert torch.equal(attn.dms_proj_alpha.weight, sd["model.layers.1.self_attn.dms_proj_alpha.weight"])
    spy = Spy(2)
    with torch.no_grad():
        loaded(ids, pos, spy)
    assert spy.seen[1][3].abs().max() > 5.0


def test_alpha_per_layer_uses_kv_head_0_everywhere(tiny_factory):
    folder, _ = tiny_factory(arch="llama", extra_config={"dms_window_size": 2, "dms_alpha_per": "layer"})
    model, _ = load_model(folder)
    spy = Spy(2)
    with torch.no_grad():
        model(torch.randint(0, 131, (1, 8)), torch.arange(8)[None], spy)
    logits = spy.seen[0][3]
    assert torch.equal(logits[:, 1], logits[:, 0])


def test_sink_tokens_keep_the_first_keys_in_every_layer(tiny_factory):
    """dms_sink_tokens = 3: the logits at positions 1..3 (which decide keys 0..2) are forced to keep
    in every layer, for any chunk that holds them; everything else is the plain model's."""
    folder, _ = tiny_factory(arch="llama", extra_config={"dms_window_size": 2, "dms_initial_alpha_offset": 0.0,
                                                          "dms_sink_tokens": 3})
    model, _ = load_model(folder)
    plain, _ = load_model(folder, dms={"dms_sink_tokens": 0})
    assert model.config.dms.sink_tokens == 3 and model.config.dms.to_hf_dict()["dms_sink_tokens"] == 3
    torch.manual_seed(0)
    ids, pos = torch.randint(0, 131, (2, 12)), torch.arange(12)[None].expand(2, -1)
    ours, theirs = Spy(2), Spy(2)
    with torch.no_grad():
        model(ids, pos, ours)
        plain(ids, pos, theirs)
    mine, base = ours.seen[0][3], theirs.seen[0][3]  # layer 0 reads the same residual stream
    assert (base[..., 1:4] > 0).any()  # without sinks some of the first keys are evicted
    assert (mine[..., 1:4] == ref.SINK_LOGIT).all()
    assert torch.equal(mine[..., :1], base[..., :1]) and torch.equal(mine[..., 4:], base[..., 4:])
    assert all((seen[3][..., 1:4] == ref.SINK_LOGIT).all() for seen in ours.seen.values())
    later = Spy(2)  # a chunk starting at position 2 decides keys 1 and 2 at its first two columns
    with torch.no_grad():
        model(ids[:, 2:], pos[:, 2:], later)
    assert (later.seen[0][3][..., :2] == ref.SINK_LOGIT).all() and torch.equal(later.seen[0][3][..., 2:],
                                                                              base[..., 4:])
    with pytest.raises(ValueError, match="dms_sink_tokens: expected an int >= 0"):
        DMSConfig(sink_tokens=-1)


def test_disable_eviction_behaves_as_vanilla(tiny_factory):
    folder, _ = tiny_factory(arch="llama", extra_config={"dms_window_size": 1, "dms_initial_alpha_offset": -50.0,
                                                          "dms_disable_eviction": True})
    model, _ = load_model(folder)
    assert not model.config.dms_active
    plain, _ = load_model(folder, dms={"dms_disable_eviction": True})
    evicting, _ = load_model(folder, dms={"dms_disable_eviction": False})
    ids, pos = torch.randint(0, 131, (1, 16)), torch.arange(16)[None]
    with torch.no_grad():
        a = model(ids, pos, FullSequenceAttention(1))
        b = plain(ids, pos, FullSequenceAttention(1))
        c = evicting(ids, pos, FullSequenceAttention(1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)  # with offset -50 nearly everything is evicted after 1 token


def test_bf16_model_runs_and_logits_stay_float32(tiny_factory):
    folder, _ = tiny_factory(arch="qwen3", extra_config={"dms_window_size": 2})
    model, _ = load_model(folder, dtype=torch.bfloat16)
    spy = Spy(2)
    with torch.no_grad():
        out = model(torch.randint(0, 131, (1, 6)), torch.arange(6)[None], spy)
    assert out.dtype == torch.bfloat16 and spy.seen[0][3].dtype == torch.float32
