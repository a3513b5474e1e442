"""Retrofit losses against the reference, the training attention, and a few real training steps
(eviction rises toward the target, the base stays frozen, resume continues exactly)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dms_kernels import reference as ref
from dms_runtime import validation as V
from dms_runtime.models import load_model
from dms_runtime.retrofit import (RetrofitConfig, Retrofitter, TrainingAttention, compression_target,
                                  distillation_kl)


def test_kl_is_zero_when_student_equals_teacher_and_matches_the_formula():
    s = torch.randn(2, 5, 11)
    assert distillation_kl(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    ps, pt = F.softmax(s, -1), F.softmax(t, -1)
    kl = (ps * (ps.log() - pt.log())).sum(-1)
    assert distillation_kl(s, t, mask).item() == pytest.approx((kl[mask].mean()).item(), rel=1e-5)
    assert distillation_kl(s, t, mask).item() > 0
    from dms_runtime.retrofit.losses import token_kl

    torch.testing.assert_close(token_kl(s, t), kl, rtol=1e-5, atol=1e-6)  # the per-position form
    with pytest.raises(ValueError, match="teacher_logits: expected shape"):
        token_kl(s, t[:, :4])


def test_compression_target_anneals_and_the_loss_vanishes_once_met():
    assert compression_target(0, 8) == 0.0
    assert compression_target(100, 8, 100) == pytest.approx(0.5)
    assert compression_target(10_000, 8, 100) == pytest.approx(1 - 1 / 8)
    hard = torch.ones(2, 3, 2, 7)
    assert ref.compression_loss(hard, compression_target(10_000, 8)).item() == 0.0
    assert ref.compression_loss(hard * 0, 0.5).item() == pytest.approx(0.5)
    # a continued run (CR 4 -> 8) starts at its initial CR
    assert compression_target(0, 8, 25, initial_cr=4) == pytest.approx(0.75)
    assert compression_target(50, 8, 25, initial_cr=4) == pytest.approx(1 - 1 / 6)
    assert compression_target(1000, 8, 25, initial_cr=4) == pytest.approx(1 - 1 / 8)
    with pytest.raises(ValueError, match="initial_cr: expected between 1 and final_cr=4"):
        compression_target(0, 4, initial_cr=5)


def test_training_attention_is_softmax_with_the_reference_bias():
    b, hq, h, t, d, w, tau = 2, 4, 2, 9, 8, 2, 0.3
    q, k, v = torch.randn(b, hq, t, d), torch.randn(b, h, t, d), torch.randn(b, h, t, d)
    logits = torch.randn(b, h, t)
    att = TrainingAttention(w, tau, torch.Generator().manual_seed(5))
    out = att.attend(0, q, k, v, logits)
    noise = ref.logistic_noise(logits.shape, generator=torch.Generator().manual_seed(5))
    bias = ref.training_bias(logits, w, tau, noise).repeat_interleave(2, 1)
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(d) + bias
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v.repeat_interleave(2, 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(att.hard[0].detach(), (torch.sigmoid((logits + noise) / tau) > 0.5).float())


@pytest.fixture
def adapter_model(tiny_factory):
    folder, _ = tiny_factory(arch="llama", extra_config={"dms_window_size": 2, "dms_separate_alpha": True})
    return folder


def test_training_raises_eviction_and_keeps_the_base_frozen(adapter_model, tmp_path):
    model, _ = load_model(adapter_model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "dms_" not in n}
    cfg = RetrofitConfig(final_cr=4, steps_per_cr=4, window=2, tau=0.1, lr=0.05, warmup_steps=2, seed=1)
    tr = Retrofitter(model, cfg, log_path=tmp_path / "log.jsonl")
    ids = torch.randint(0, 131, (4, 24))
    lengths = torch.tensor([24, 20, 17, 24])
    logs = [tr.step(ids, lengths) for _ in range(25)]
    assert all(math.isfinite(r["loss"]) for r in logs)
    assert logs[0]["evicted_fraction"] < 0.05  # the zero-initialised adapter evicts nothing
    assert logs[-1]["evicted_fraction"] > 0.3
    for n, p in model.named_parameters():
        if "dms_" not in n:
            assert torch.equal(p, base[n]), n
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 25 and {"kl", "compression_loss", "achieved_cr", "tokens_per_s"} <= set(json.loads(lines[0]))


def test_resume_continues_exactly(adapter_model, tmp_path):
    ids = torch.randint(0, 131, (2, 16))
    cfg = RetrofitConfig(final_cr=4, steps_per_cr=3, window=2, lr=0.05, warmup_steps=2, seed=3)
    straight, _ = load_model(adapter_model)
    tr = Retrofitter(straight, cfg)
    for _ in range(6):
        tr.step(ids)
    first, _ = load_model(adapter_model)
    tr1 = Retrofitter(first, cfg)
    for _ in range(3):
        tr1.step(ids)
    tr1.save(tmp_path / "ckpt")
    second, _ = load_model(adapter_model)
    tr2 = Retrofitter(second, cfg)
    tr2.resume(tmp_path / "ckpt")
    for _ in range(3):
        tr2.step(ids)
    for (n, a), (_, b) in zip(straight.named_parameters(), second.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


def test_resume_drops_the_log_records_after_the_checkpoint(adapter_model, tmp_path):
    ids = torch.randint(0, 131, (1, 12))
    cfg = RetrofitConfig(final_cr=2, steps_per_cr=2, window=2, lr=0.05, warmup_steps=1, seed=2)
    log = tmp_path / "log.jsonl"
    tr = Retrofitter(load_model(adapter_model)[0], cfg, log_path=log)
    for _ in range(2):
        tr.step(ids)
    tr.save(tmp_path)
    for _ in range(2):  # logged, then the run stops before its next save
        tr.step(ids)
    with open(log, "a") as f:
        f.write('{"step": 5, "kl"')  # killed mid-write
    assert len(log.read_text().splitlines()) == 5
    again = Retrofitter(load_model(adapter_model)[0], cfg, log_path=log)
    again.resume(tmp_path)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    again.step(ids)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


def test_init_from_starts_from_an_earlier_retrofit(adapter_model, tmp_path):
    first, _ = load_model(adapter_model)
    tr = Retrofitter(first, RetrofitConfig(final_cr=2, steps_per_cr=2, window=2, lr=0.05, warmup_steps=1, seed=1))
    for _ in range(3):
        tr.step(torch.randint(0, 131, (2, 16)))
    tr.save(tmp_path / "cr2")
    second, _ = load_model(adapter_model)
    tr2 = Retrofitter(second, RetrofitConfig(final_cr=4, initial_cr=2, window=2, init_from=str(tmp_path / "cr2")))
    assert tr2.step_count == 0
    for (n, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), n
    rec = tr2.step(torch.randint(0, 131, (2, 16)))
    assert rec["target_fraction"] == pytest.approx(0.5)
    with pytest.raises(FileNotFoundError, match="init_from: .* does not exist"):
        Retrofitter(load_model(adapter_model)[0], RetrofitConfig(init_from=str(tmp_path / "nowhere")))


def test_bad_settings(adapter_model, tiny_factory):
    with pytest.raises(ValueError, match="trainable"):
        RetrofitConfig(trainable="some")
    folder, _ = tiny_factory(arch="llama")
    vanilla, _ = load_model(folder)
    with pytest.raises(ValueError, match="model: load it with DMS settings"):
        Retrofitter(vanilla, RetrofitConfig())
    borrowed, _ = load_model(folder, dms={"dms_window_size": 2})
    with pytest.raises(ValueError, match="trainable: 'dms' trains the adapter only"):
        Retrofitter(borrowed, RetrofitConfig())


def test_borrowed_variant_trains_all_weights(tiny_factory):
    folder, _ = tiny_factory(arch="qwen3", head_dim=16, extra_config={"dms_window_size": 2})
    model, _ = load_model(folder)
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    tr = Retrofitter(model, RetrofitConfig(final_cr=2, steps_per_cr=2, window=2, lr=1e-3, trainable="all"))
    rec = [tr.step(torch.randint(0, 131, (2, 12))) for _ in range(3)][-1]
    assert math.isfinite(rec["loss"]) and rec["target_fraction"] > 0
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_before)


def test_bf16_autocast_step(adapter_model):
    model, _ = load_model(adapter_model)
    tr = Retrofitter(model, RetrofitConfig(final_cr=2, steps_per_cr=1, window=2, lr=0.01, autocast_bf16=True))
    rec = tr.step(torch.randint(0, 131, (2, 12)))
    assert math.isfinite(rec["loss"]) and model.model.layers[0].self_attn.dms_proj_alpha.weight.dtype == torch.float32


def test_adapter_logits_stay_float32_under_bf16_autocast():
    """A bf16 logit near the offset moves in steps of 1/32: small adapter updates would vanish."""
    gen = torch.Generator().manual_seed(0)
    hidden, norm_w = torch.randn(1, 5, 16, generator=gen), torch.ones(16)
    proj_w = torch.randn(2, 16, generator=gen) * 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ref.adapter_eviction_logits(hidden, norm_w, proj_w)
    want = ref.adapter_eviction_logits(hidden, norm_w, proj_w)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_a_layer_run_again_reuses_its_noise_and_replaces_its_decisions():
    """What activation checkpointing needs of the training backend: the same layer twice gives the
    same output, and the hard decisions hold one entry per layer, in layer order."""
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4)
    att = TrainingAttention(2, 0.5, torch.Generator().manual_seed(1))
    first = att.attend(3, q, k, v, torch.randn(1, 1, 6))
    logits = torch.randn(1, 1, 6)
    other = att.attend(1, q, k, v, logits)
    torch.testing.assert_close(att.attend(1, q, k, v, logits), other, rtol=0, atol=0)
    assert len(att.hard) == 2 and att.hard[1] is att._hard[3]
    assert not torch.equal(first, other)


@pytest.mark.parametrize("autocast", [False, True])
def test_checkpointed_layers_train_the_same_steps_and_keep_less_for_backward(adapter_model, autocast):
    ids, lengths = torch.randint(0, 131, (2, 40)), torch.tensor([40, 29])
    cfg = dict(final_cr=4, steps_per_cr=2, window=3, lr=0.05, warmup_steps=1, seed=4, autocast_bf16=autocast)
    runs = {}
    for ckpt in (False, True):
        model, _ = load_model(adapter_model)
        tr = Retrofitter(model, RetrofitConfig(**cfg, checkpoint_layers=ckpt))
        assert model.checkpoint_layers is ckpt
        runs[ckpt] = model, [tr.step(ids, lengths) for _ in range(3)]
    (plain, logs), (ckpt, logs_c) = runs[False], runs[True]
    for a, b in zip(logs, logs_c):
        for key in ("loss", "kl", "compression_loss", "evicted_fraction", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert logs[-1]["evicted_fraction"] > 0  # the adapter moved, so the equality above says something
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)

    def saved_bytes(model):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        pos = torch.arange(40).expand(2, 40)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, pos, TrainingAttention(3, 0.1, torch.Generator().manual_seed(0), lengths))
        return total[0]

    assert saved_bytes(ckpt) < 0.5 * saved_bytes(plain)
    with torch.no_grad():  # no recording, no recomputation: the plain forward
        pos = torch.arange(40).expand(2, 40)
        torch.testing.assert_close(ckpt(ids, pos, TrainingAttention(3, 0.1, torch.Generator().manual_seed(0))),
                                   plain(ids, pos, TrainingAttention(3, 0.1, torch.Generator().manual_seed(0))),
                                   rtol=1e-4, atol=1e-4)  # two models whose weights agree to 1e-5
    with pytest.raises(V.SettingTypeError, match="checkpoint_layers"):
        RetrofitConfig(checkpoint_layers="yes")
