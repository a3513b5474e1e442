"""LoRA retrofits (dms_lora_*): the update is the low-rank formula, applies only with eviction on,
starts as the identity, trains with the adapter, saves and loads with it; bad settings are named."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import dms_runtime as dr
from dms_runtime.config import LORA_TARGETS, DMSConfig
from dms_runtime.models import load_model
from dms_runtime.models.full_sequence import FullSequenceAttention
from dms_runtime.models.lora import LoRALinear, has_merged_lora, merge_lora, unmerge_lora
from dms_runtime.retrofit import RetrofitConfig, Retrofitter

ADAPTER = {"dms_window_size": 2, "dms_separate_alpha": True, "dms_initial_alpha_offset": 0.0}


def randomise(model, scale=0.3):
    """Nonzero updates (a fresh one is B = 0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.dms_lora_b.normal_(0, scale)


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids), FullSequenceAttention(2))


@pytest.fixture
def folder(tiny_factory):
    return tiny_factory(arch="llama", extra_config=ADAPTER)[0]


def test_the_update_is_the_low_rank_formula_and_only_while_eviction_is_on(folder):
    model, _ = load_model(folder, dms={"dms_lora_rank": 3, "dms_lora_alpha": 6.0})
    randomise(model)
    proj = model.model.layers[1].mlp.down_proj
    assert isinstance(proj, LoRALinear) and proj.scaling == 2.0
    x = torch.randn(2, 5, proj.in_features)
    want = F.linear(x, proj.weight + 2.0 * proj.dms_lora_b @ proj.dms_lora_a, proj.bias)
    torch.testing.assert_close(proj(x), want, rtol=1e-5, atol=1e-5)
    model.config.dms.disable_eviction = True
    torch.testing.assert_close(proj(x), F.linear(x, proj.weight, proj.bias))


def test_fresh_update_is_the_identity_and_eviction_off_is_the_base(folder):
    ids = torch.randint(0, 131, (2, 13))
    plain, _ = load_model(folder)
    lora, _ = load_model(folder, dms={"dms_lora_rank": 4})
    assert sum(isinstance(m, LoRALinear) for m in lora.modules()) == len(LORA_TARGETS) * 2
    torch.testing.assert_close(logits_of(lora, ids), logits_of(plain, ids))  # B = 0
    randomise(lora)
    assert not torch.allclose(logits_of(lora, ids), logits_of(plain, ids), atol=1e-3)
    plain.config.dms.disable_eviction = lora.config.dms.disable_eviction = True
    torch.testing.assert_close(logits_of(lora, ids), logits_of(plain, ids), rtol=0, atol=0)


def test_fresh_updates_are_seeded_per_projection(folder):
    a, _ = load_model(folder, dms={"dms_lora_rank": 2})
    b, _ = load_model(folder, dms={"dms_lora_rank": 2})
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    names = [n for n in pa if n.endswith("dms_lora_a")]
    assert len(names) == 14 and all(torch.equal(pa[n], pb[n]) for n in names)
    assert not torch.equal(pa["model.layers.0.self_attn.q_proj.dms_lora_a"], pa["model.layers.1.self_attn.q_proj.dms_lora_a"])
    assert all(pa[n].abs().max() > 0 for n in names)


def test_targets_pick_the_projections(folder):
    model, _ = load_model(folder, dms={"dms_lora_rank": 2, "dms_lora_targets": ["v_proj", "q_proj"]})
    updated = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert updated == {"q_proj", "v_proj"}
    assert model.config.dms.lora_targets == ("q_proj", "v_proj")
    assert model.config.dms.to_hf_dict()["dms_lora_targets"] == ["q_proj", "v_proj"]
    assert "dms_lora_rank" not in DMSConfig().to_hf_dict()  # a model without LoRA: its keys as before


@pytest.mark.parametrize("change, message", [
    ({"lora_rank": -1}, "dms_lora_rank"),
    ({"lora_rank": 2.5}, "dms_lora_rank"),
    ({"lora_alpha": 0}, "dms_lora_alpha"),
    ({"lora_targets": ["q_proj", "w_proj"]}, "dms_lora_targets: expected distinct names"),
    ({"lora_targets": []}, "dms_lora_targets"),
    ({"lora_targets": ["q_proj", "q_proj"]}, "dms_lora_targets"),
    ({"lora_targets": "q_proj"}, "dms_lora_targets: expected a list"),
])
def test_bad_settings_are_named(change, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DMSConfig(**change)


def test_tensor_parallel_splits_the_update_so_each_rank_merges_its_slice(folder):
    """A rank's slice of ``B A`` is its rows of ``B`` times ``A`` (q/k/v/gate/up) or ``B`` times its
    columns of ``A`` (o/down): the shard rules give exactly the weight's slice of the full update."""
    from dms_runtime.parallel.shard import check_divisible, shard_rule

    model, _ = load_model(folder, dms={"dms_lora_rank": 2})
    randomise(model)
    check_divisible(model.config, 2)  # a LoRA model splits
    n = 2
    for name, mod in model.named_modules():
        if not isinstance(mod, LoRALinear):
            continue
        full = mod.delta()
        for rank in range(n):
            def part(t, kind):
                rule = shard_rule(f"{name}.{kind}", model.config, n, rank)
                if rule is None:
                    return t
                dim, a, b = rule
                return t[a:b] if dim == 0 else t[:, a:b]
            w = part(mod.weight, "weight")
            local = part(mod.dms_lora_b, "dms_lora_b").float() @ part(mod.dms_lora_a, "dms_lora_a").float()
            assert local.shape == w.shape and w.shape != full.shape, name
            torch.testing.assert_close(local * mod.scaling, part(full, "weight"))


def test_half_an_update_in_a_checkpoint_is_an_error(folder, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    weights = load_file(str(copy / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.dms_lora_a"] = torch.zeros(2, 64)
    save_file(weights, str(copy / "model.safetensors"))
    with pytest.raises(ValueError, match="missing from the checkpoint: .*q_proj.dms_lora_b"):
        load_model(copy, dms={"dms_lora_rank": 2})


def test_training_updates_lora_and_adapter_keeps_base_and_loads_back(folder, tmp_path):
    model, _ = load_model(folder, dms={"dms_lora_rank": 2, "dms_lora_targets": ["q_proj", "down_proj"]})
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "dms_" not in n}
    cfg = RetrofitConfig(final_cr=2, steps_per_cr=2, window=2, lr=0.02, lora_lr=0.01, warmup_steps=2, seed=1)
    tr = Retrofitter(model, cfg, base_model=str(folder))
    assert [g["base_lr"] for g in tr.opt.param_groups] == [0.02, 0.01]
    ids = torch.randint(0, 131, (2, 16))
    for _ in range(3):
        tr.step(ids)
    assert [g["lr"] for g in tr.opt.param_groups] == [0.02, 0.01]  # warmed up, each group at its rate
    for n, p in model.named_parameters():
        if "dms_" not in n:
            assert torch.equal(p, base[n]), n
    b = model.model.layers[0].self_attn.q_proj.dms_lora_b
    assert b.abs().max() > 0  # trained from zero
    out = tr.save(tmp_path / "run")
    saved = load_file(str(out / "dms_weights.safetensors"))
    assert sum(n.endswith(("dms_lora_a", "dms_lora_b")) for n in saved) == 2 * 2 * 2
    settings = json.loads((out / "dms_config.json").read_text())
    assert settings["dms_lora_rank"] == 2 and settings["dms_lora_targets"] == ["q_proj", "down_proj"]
    assert settings["retrofit"]["lora_lr"] == 0.01
    loaded = dr.load(out)  # the retrofit folder: base + adapter + updates
    ids = torch.randint(0, 131, (1, 11))
    torch.testing.assert_close(logits_of(loaded.model, ids), logits_of(model, ids))
    # resume restores both groups; a state saved without the updates is refused
    again, _ = load_model(folder, dms={"dms_lora_rank": 2, "dms_lora_targets": ["q_proj", "down_proj"]})
    tr2 = Retrofitter(again, cfg)
    tr2.resume(out)
    assert tr2.step_count == 3 and [g["base_lr"] for g in tr2.opt.param_groups] == [0.02, 0.01]
    torch.testing.assert_close(tr2.step(ids)["kl"], tr.step(ids)["kl"])
    without, _ = load_model(folder)
    with pytest.raises(Exception, match="weights this model does not have|other trainable parameters"):
        Retrofitter(without, cfg).resume(out)


def test_decay_lowers_each_groups_rate_linearly_over_the_last_steps_and_resume_keeps_the_schedule(folder, tmp_path):
    # warm-up 2, decay 3 of 6 steps: factors 1/2, 1, 1, 1, 2/3, 1/3 of each group's own rate
    cfg = RetrofitConfig(final_cr=2, steps_per_cr=2, window=2, lr=0.02, lora_lr=0.01, warmup_steps=2, seed=1,
                         decay_steps=3, total_steps=6)
    factors = [0.5, 1, 1, 1, 2 / 3, 1 / 3]
    model, _ = load_model(folder, dms={"dms_lora_rank": 2})
    tr = Retrofitter(model, cfg)
    ids = torch.randint(0, 131, (1, 12))
    seen = []
    for i in range(4):
        rec = tr.step(ids)
        seen.append([g["lr"] for g in tr.opt.param_groups])
        assert rec["lr"] == pytest.approx(0.02 * factors[i])
    out = tr.save(tmp_path / "run")
    assert json.loads((out / "dms_config.json").read_text())["retrofit"]["decay_steps"] == 3
    again, _ = load_model(folder, dms={"dms_lora_rank": 2})
    tr = Retrofitter(again, cfg)
    tr.resume(out)  # steps 5 and 6 go on down the same line
    for _ in range(2):
        tr.step(ids)
        seen.append([g["lr"] for g in tr.opt.param_groups])
    for got, f in zip(seen, factors, strict=True):
        assert got == pytest.approx([0.02 * f, 0.01 * f])
    plain = Retrofitter(load_model(folder, dms={"dms_lora_rank": 2})[0],
                        RetrofitConfig(final_cr=2, steps_per_cr=2, window=2, lr=0.02, warmup_steps=2, total_steps=6))
    assert [plain.lr_at(s) for s in range(6)] == pytest.approx([0.01] + [0.02] * 5)  # no decay: constant
    with pytest.raises(ValueError, match="decay_steps: expected at most total_steps=None .*got 3"):
        RetrofitConfig(decay_steps=3)
    with pytest.raises(ValueError, match="decay_steps: expected at most total_steps=2 .*got 3"):
        RetrofitConfig(decay_steps=3, total_steps=2)


@pytest.mark.parametrize("backend", ["paged", "oracle"])
def test_generate_equals_the_full_sequence_forward_with_an_update(folder, backend):
    lm = dr.load(folder, dms={"dms_lora_rank": 3}, merge_lora=False)
    randomise(lm.model, 0.2)
    ps = [torch.randint(0, 131, (n,)).tolist() for n in (1, 7, 19)]
    res = dr.generate(lm, ps, max_new_tokens=9, ignore_eos=True, backend=backend)
    plain = dr.generate(dr.load(folder), ps, max_new_tokens=9, ignore_eos=True, backend=backend)
    assert res.token_ids != plain.token_ids  # the update changes what is generated
    for p, out in zip(ps, res.outputs):
        seq = p + out.token_ids[:-1]
        full = logits_of(lm.model, torch.tensor([seq]))[0]
        assert full[len(p) - 1:].argmax(-1).tolist() == out.token_ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_merged_projection_is_one_matmul_and_the_base_comes_back(folder, dtype):
    model, _ = load_model(folder, dms={"dms_lora_rank": 3, "dms_lora_alpha": 6.0}, dtype=dtype)
    randomise(model)
    proj = model.model.layers[0].self_attn.k_proj
    base = proj.weight.detach().clone()
    x = torch.randn(3, proj.in_features, dtype=dtype)
    apart = proj(x)
    assert merge_lora(model) == len(LORA_TARGETS) * 2 and proj.merged and has_merged_lora(model)
    assert merge_lora(model) == 0  # merging twice adds nothing
    want = (base.float() + 2.0 * proj.dms_lora_b.float() @ proj.dms_lora_a.float()).to(dtype)
    assert torch.equal(proj.weight, want)  # W + scaling B A, rounded once to the weight's dtype
    assert torch.equal(proj(x), F.linear(x, want, proj.bias))  # eviction on: the merged weight only
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.05}
    torch.testing.assert_close(proj(x), apart, **tol)
    model.config.dms.disable_eviction = True  # eviction off: the base, up to the merge's rounding
    torch.testing.assert_close(proj(x), F.linear(x, base, proj.bias), **tol)
    assert "merged" in repr(proj)
    assert unmerge_lora(model) == len(LORA_TARGETS) * 2 and not has_merged_lora(model)
    torch.testing.assert_close(proj.weight, base, **tol)
    if dtype == torch.float32:
        assert not torch.equal(proj.weight, want)


def test_load_merges_a_lora_retrofit_and_generates_as_the_update_kept_apart(folder, tmp_path):
    apart = dr.load(folder, dms={"dms_lora_rank": 3}, merge_lora=False)
    randomise(apart.model, 0.2)
    cfg = RetrofitConfig(final_cr=2, steps_per_cr=2, window=2, lr=1e-9, lora_lr=1e-9, warmup_steps=0)
    out = Retrofitter(apart.model, cfg, base_model=str(folder)).save(tmp_path / "run")
    merged = dr.load(out)  # the default: merged for inference
    assert has_merged_lora(merged.model) and not has_merged_lora(dr.load(out, merge_lora=False).model)
    ids = torch.randint(0, 131, (2, 17))
    torch.testing.assert_close(logits_of(merged.model, ids), logits_of(apart.model, ids), rtol=1e-4, atol=1e-4)
    ps = [torch.randint(0, 131, (n,)).tolist() for n in (1, 6, 23)]
    kw = dict(max_new_tokens=8, ignore_eos=True)
    assert dr.generate(merged, ps, **kw).token_ids == dr.generate(apart, ps, **kw).token_ids
    # weights loaded into, or a retrofit of, a merged model would leave the old update in the base
    from dms_runtime.models.loading import load_named_weights

    with pytest.raises(ValueError, match="merge_lora=False"):
        load_named_weights(merged.model, out / "dms_weights.safetensors")
    with pytest.raises(ValueError, match="merge_lora=False"):
        Retrofitter(merged.model, cfg)
    with pytest.raises(TypeError, match="merge_lora: expected True or False"):
        dr.load(out, merge_lora="yes")
