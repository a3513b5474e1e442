"""The adapter's warm start: the far-attention statistic against a loop over queries, the fit and
its calibration, and the fitted adapter read back through the model's own decisions."""

import json
import math

import pytest
import torch

from dms_kernels import reference as ref
from dms_runtime.models import load_model
from dms_runtime.retrofit import warm_start as W


def _far_by_loop(q, k, window):
    """Per KV head and key: max over the group of mean_{i > j + w} p[i, j] * (i + 1)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = torch.full((b, hkv, t), 0.0, dtype=torch.float64)
    for bb in range(b):
        for h in range(hq):
            kk = k[bb, h // g].double()
            for j in range(t):
                vals = []
                for i in range(j + window + 1, t):
                    s = (q[bb, h, i].double() @ kk[: i + 1].T) / math.sqrt(d)
                    vals.append(torch.softmax(s, -1)[j].item() * (i + 1))
                m = sum(vals) / len(vals) if vals else 0.0
                out[bb, h // g, j] = max(out[bb, h // g, j].item(), m)
    return out


@pytest.mark.parametrize("t,window,g", [(9, 2, 2), (12, 1, 3), (7, 6, 1), (5, 7, 2)])
def test_far_attention_matches_a_loop_and_attends_densely(t, window, g):
    gen = torch.Generator().manual_seed(t * 31 + window)
    q = torch.randn(2, 2 * g, t, 8, generator=gen)
    k, v = torch.randn(2, 2, t, 8, generator=gen), torch.randn(2, 2, t, 8, generator=gen)
    att = W._FarAttention(window)
    out = att.attend(0, q, k, v, None)
    torch.testing.assert_close(att.far[0].double(), _far_by_loop(q, k, window), rtol=1e-4, atol=1e-6)
    keep = torch.zeros(2, 2, t, dtype=torch.bool)
    torch.testing.assert_close(out, ref.dms_attention(q, k, v, keep, window), rtol=1e-5, atol=1e-5)
    assert att.counts.tolist() == [max(0, t - j - window - 1) for j in range(t)]


def test_fit_separates_and_calibration_reaches_the_target():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2000, 16, generator=gen)
    x[:, -1] = 3.0  # a near-constant direction, as normalised residual streams have: it carries the offset
    y = torch.stack([x[:, 0] > 0.4, x[:, 1] < -0.2], 1)
    u = W._fit_layer(x, y, offset=5.0, iters=300)
    assert ((x @ u.T - 5.0 > 0) == y).float().mean().item() > 0.95
    x[:, -1] += 0.1 * torch.randn(2000, generator=gen)  # near-constant only
    for target in (0.1, 0.5, 0.75, 0.875, 0.97):
        uc = W._calibrate(x, u, 5.0, target)
        assert (x @ uc.T > 5.0).float().mean().item() == pytest.approx(target, abs=0.01)
        # the shift keeps most of the fit's order within each KV head
        for h in range(2):
            rank = lambda z: z.argsort().argsort().double()  # noqa: E731
            r = torch.corrcoef(torch.stack([rank(x @ u[h]), rank(x @ uc[h])]))[0, 1]
            assert r > 0.9


class _DenseRecording:
    """Attends densely (no eviction, as the fit's forward) and records each layer's decisions."""

    def __init__(self):
        self.decisions = {}

    def attend(self, layer, q, k, v, logits):
        self.decisions[layer] = ref.eviction_decisions(logits)
        none_evicted = torch.zeros(k.shape[:3], dtype=torch.bool)
        return ref.dms_attention(q, k, v, none_evicted, 1)


def test_importance_keeps_the_keys_that_cost_most_to_evict():
    # a rare group of "keep" keys (think: the attention sink) that the features barely separate from the
    # evicted ones: weighing each kept key by its far attention makes the fit keep that group
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4000, 8, generator=gen)
    x[:, -1] = 3.0
    heavy = (x[:, 1] > 1.6) & (x[:, 0] > -1)
    y = (x[:, 0] > -1) & ~heavy  # evict
    y = y[:, None]
    importance = torch.where(heavy, 50.0, 1.0)[:, None]
    kept = lambda u: (x[heavy] @ u.T - 5.0 <= 0).float().mean().item()  # noqa: E731
    plain = W._fit_layer(x, y, 5.0, 300)
    weighted = W._fit_layer(x, y, 5.0, 300, importance=importance)
    assert kept(weighted) > 0.9 > kept(plain) + 0.2


@pytest.fixture
def adapter_model(tiny_factory):
    folder, _ = tiny_factory(arch="llama", extra_config={"dms_window_size": 4, "dms_separate_alpha": True})
    return folder


@pytest.mark.parametrize("cr", [2.0, 4.0])
def test_warm_start_marks_the_target_fraction_through_the_models_own_decisions(adapter_model, cr):
    model, _ = load_model(adapter_model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "dms_" not in n}
    ids = torch.randint(0, 131, (3, 64), generator=torch.Generator().manual_seed(int(cr)))
    report = W.warm_start(model, ids, cr, min_far=8, iters=100)
    assert report.layers == len(model.model.layers) and report.target_fraction == pytest.approx(1 - 1 / cr)
    # the model's own decisions (its logits, shifted, > 0) on the fitting sequences mark what the fit
    # reports, read where the fit read them: under the frozen base's dense attention
    backend = _DenseRecording()
    with torch.no_grad():
        model(ids, torch.arange(64).expand(3, 64), backend)
    for layer, frac in enumerate(report.marked_fraction):
        got = backend.decisions[layer][:, :, :63].float().mean().item()
        assert got == pytest.approx(frac, abs=0.02), layer
        assert frac == pytest.approx(1 - 1 / cr, abs=0.05)
    assert all(0.5 < a <= 1.0 for a in report.label_agreement)
    for n, p in model.named_parameters():
        if "dms_" not in n:
            assert torch.equal(p, base[n]), n


def test_warm_start_checks_its_arguments(adapter_model, tiny_factory):
    model, _ = load_model(adapter_model)
    with pytest.raises(ValueError, match="sequences: 10 tokens leave no key"):
        W.warm_start(model, torch.zeros(1, 10, dtype=torch.int64), 4.0)
    with pytest.raises(ValueError, match="sequences: expected an integer tensor"):
        W.warm_start(model, torch.zeros(1, 64), 4.0)
    with pytest.raises(ValueError, match="cr"):
        W.warm_start(model, torch.zeros(1, 64, dtype=torch.int64), 0.5)
    borrowed, _ = tiny_factory(arch="llama", extra_config={"dms_window_size": 4})
    with pytest.raises(ValueError, match="dms_separate_alpha"):
        W.warm_start(load_model(borrowed)[0], torch.zeros(1, 64, dtype=torch.int64), 4.0)


def test_cli_warm_start_alone_writes_a_loadable_retrofit(tiny_with_tokenizer, tmp_path):
    from dms_runtime.cli import main
    import dms_runtime as dr

    out = tmp_path / "ws"
    assert main(["retrofit", "-m", str(tiny_with_tokenizer), "--out", str(out), "--cr", "4", "--cr-start", "4",
                 "--steps", "0", "--warm-start", "2", "--seq-len", "96", "--window", "8", "--batch", "1",
                 "--data", "synthetic", "--sinks", "2"]) == 0
    fit = json.loads((out / "warm_start.json").read_text())
    assert fit["sequences"] == 2 and fit["target_fraction"] == pytest.approx(0.75)
    settings = json.loads((out / "dms_config.json").read_text())
    assert settings["retrofit"]["warm_start"] == 2 and settings["dms_sink_tokens"] == 2
    lm = dr.load(str(out))
    assert lm.config.dms.sink_tokens == 2
    assert any(p.abs().sum() > 0 for n, p in lm.model.named_parameters() if n.endswith("dms_proj_alpha.weight"))
    assert main(["retrofit", "-m", str(tiny_with_tokenizer), "--out", str(tmp_path / "x"), "--warm-start", "2",
                 "--init-from", str(out), "--steps", "1"]) == 2
