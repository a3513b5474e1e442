"""The cached teacher: the top-k + tail KL against a position-by-position re-implementation, and a
step that meets its batch again in the cache skips the teacher's forward pass and changes nothing
else."""

import json
import math

import pytest
import torch

from dms_runtime.models import load_model
from dms_runtime.retrofit import RetrofitConfig, Retrofitter, distillation_kl
from dms_runtime.retrofit.losses import TopK, topk_kl
from dms_runtime.retrofit.teacher_cache import CacheKey, TeacherCache
from dms_runtime.validation import UserError


def _bucketed_kl(s_logits, t_logits, k):
    """KL(student || teacher) over the teacher's k most likely tokens plus one bucket for the rest, one
    position at a time in plain Python."""
    ps, pt = torch.softmax(s_logits.double(), -1).tolist(), torch.softmax(t_logits.double(), -1).tolist()
    top = sorted(range(len(pt)), key=lambda v: -pt[v])[:k]
    kl = sum(ps[v] * (math.log(ps[v]) - math.log(pt[v])) for v in top)
    qs, qt = 1 - sum(ps[v] for v in top), 1 - sum(pt[v] for v in top)
    return kl + (qs * (math.log(qs) - math.log(qt)) if k < len(pt) else 0.0)


@pytest.mark.parametrize("k", [1, 3, 16, 30, 31])
def test_topk_kl_matches_the_bucketed_formula_and_bounds_the_full_kl(k):
    g = torch.Generator().manual_seed(k)
    b, t, v = 2, 7, 31
    s, te = torch.randn(b, t, v, generator=g) * 2, torch.randn(b, t, v, generator=g) * 2
    lengths = torch.tensor([7, 3])
    mask = torch.arange(t)[None] < lengths[:, None]
    expected = [_bucketed_kl(s[i, j], te[i, j], k) for i in range(b) for j in range(lengths[i])]
    got = topk_kl(s, TopK.from_logits(te, k), mask)
    assert got.item() == pytest.approx(sum(expected) / len(expected), rel=1e-4, abs=1e-6)
    full = distillation_kl(s, te, mask).item()
    assert 0 <= got.item() <= full + 1e-5  # merging tokens into one bucket can only lose divergence
    if k == v:
        assert got.item() == pytest.approx(full, rel=1e-5)


def test_topk_keeps_the_tail_mass_and_refuses_a_bad_k():
    logits = torch.randn(3, 4, 20)
    top = TopK.from_logits(logits, 5)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(top.log_tail.exp(), 1 - p.topk(5, -1).values.sum(-1), rtol=1e-5, atol=1e-6)
    assert top.ids.dtype == torch.int32 and top.logprobs.shape == (3, 4, 5)
    for k in (0, 21):
        with pytest.raises(ValueError, match="k: expected 1..20"):
            TopK.from_logits(logits, k)


@pytest.fixture
def adapter_model(tiny_factory):
    folder, _ = tiny_factory(arch="llama", extra_config={"dms_window_size": 2, "dms_separate_alpha": True})
    return folder


def _trainer(folder, cache_dir, k=8):
    model, _ = load_model(folder)
    cache = TeacherCache(cache_dir, CacheKey(base_model="tiny", k=k, vocab=model.config.vocab_size,
                                             dtype="float32", autocast_bf16=False))
    cfg = RetrofitConfig(final_cr=2, steps_per_cr=2, window=2, lr=0.05, warmup_steps=1, seed=3)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return Retrofitter(model, cfg, teacher_cache=cache), model, calls


def test_a_cached_batch_skips_the_teacher_and_trains_the_same(adapter_model, tmp_path):
    ids, lengths = torch.randint(0, 131, (2, 24)), torch.tensor([24, 19])
    first, m1, calls1 = _trainer(adapter_model, tmp_path / "c")
    rec1 = first.step(ids, lengths)
    assert len(calls1) == 2 and rec1["teacher_cached"] is False  # teacher + student
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 1
    again, m2, calls2 = _trainer(adapter_model, tmp_path / "c")
    rec2 = again.step(ids, lengths)
    assert len(calls2) == 1 and rec2["teacher_cached"] is True  # the student only
    assert rec2["kl"] == rec1["kl"] and rec2["loss"] == rec1["loss"]
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), n
    # another batch is a miss again
    assert again.step(ids.flip(0), lengths.flip(0))["teacher_cached"] is False and len(calls2) == 3


def test_a_cache_made_otherwise_is_refused_and_a_damaged_entry_recomputed(adapter_model, tmp_path):
    ids, lengths = torch.randint(0, 131, (1, 16)), torch.tensor([16])
    tr, _, _ = _trainer(adapter_model, tmp_path / "c", k=8)
    tr.step(ids, lengths)
    with pytest.raises(UserError, match="teacher_cache: .* was made with .*'k': 8.* needs .*'k': 4"):
        _trainer(adapter_model, tmp_path / "c", k=4)
    with pytest.raises(UserError, match="teacher_top_k: expected an int >= 1 and <= 131, got 500"):
        TeacherCache(tmp_path / "d", CacheKey(base_model="tiny", k=500, vocab=131, dtype="float32",
                                              autocast_bf16=False))
    (entry,) = (tmp_path / "c").glob("*.safetensors")
    entry.write_bytes(b"not a safetensors file")
    tr2, _, calls = _trainer(adapter_model, tmp_path / "c", k=8)
    assert tr2.step(ids, lengths)["teacher_cached"] is False and len(calls) == 2
    assert tr2.teacher_cache.get(ids, lengths) is not None  # rewritten


def test_cli_second_run_on_the_same_data_hits_the_cache(tiny_with_tokenizer, tmp_path):
    from dms_runtime.cli import main

    common = ["retrofit", "-m", str(tiny_with_tokenizer), "--window", "4", "--seq-len", "16", "--batch", "1",
              "--data", "synthetic", "--lr", "0.05", "--warmup", "1", "--cr", "2", "--steps", "3",
              "--teacher-cache", str(tmp_path / "teacher"), "--teacher-top-k", "32"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--out", str(tmp_path / "b")]) == 0
    logs = [[json.loads(r) for r in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in "ab"]
    assert [r["teacher_cached"] for r in logs[0]] == [False] * 3 and [r["teacher_cached"] for r in logs[1]] == [True] * 3
    assert [r["kl"] for r in logs[0]] == [r["kl"] for r in logs[1]]
    meta = json.loads((tmp_path / "teacher" / "teacher_cache.json").read_text())
    assert meta["k"] == 32 and meta["base_model"] == str(tiny_with_tokenizer)
