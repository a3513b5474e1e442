"""The DMS retrofits of SmolLM2 that ship in the package: they load offline by name, hold only DMS
weights (the eviction adapter, and a LoRA retrofit's low-rank update), and compress the cache of a
held-out text while staying close to the vanilla model."""

import json

import pytest
import torch

import dms_runtime as dr
from dms_runtime.hub import SHIPPED_RETROFITS, retrofit_folder, shipped_retrofit
from dms_runtime.models.lora import has_merged_lora, is_lora_parameter
from dms_runtime.retrofit.evaluate import fidelity

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", sorted(SHIPPED_RETROFITS))
def test_loads_offline_by_name_with_dms_weights_only(name, smollm2_folder):
    from safetensors import safe_open

    folder = shipped_retrofit(name)
    raw = json.loads((folder / "dms_config.json").read_text())
    assert raw["base_model"] == "smollm2-135m-instruct" and raw["dms_separate_alpha"] is True
    with safe_open(str(folder / "dms_weights.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all(".dms_proj_alpha" in n or is_lora_parameter(n) for n in names)  # never the base
    rank = raw.get("dms_lora_rank", 0)
    assert any(is_lora_parameter(n) for n in names) == (rank > 0)
    # the adapter is a few hundred KB; a rank-16 update of every projection in bfloat16 about 10 MB
    assert (folder / "dms_weights.safetensors").stat().st_size < (1 << 20) + rank * (1 << 20)
    assert "dms retrofit" in (folder / "recipe.md").read_text()
    lm = dr.load(name)
    assert lm.name == name and lm.config.dms_active and lm.config.dms.window_size == raw["dms_window_size"]
    assert lm.config.dms.lora_rank == rank and has_merged_lora(lm.model) == (rank > 0)  # merged for inference
    adapters = [p for n, p in lm.model.named_parameters() if "dms_proj_alpha." in n]
    assert len(adapters) == lm.config.num_layers and all(p.abs().sum() > 0 for p in adapters)


def test_unknown_or_missing_shipped_names_are_clear(tmp_path, monkeypatch):
    import dms_runtime.hub as hub

    assert shipped_retrofit("smollm2-135m-instruct") is None
    # --init-from takes a shipped name or a folder
    assert retrofit_folder("smollm2-135m-instruct-dms-cr8") == shipped_retrofit("smollm2-135m-instruct-dms-cr8")
    assert retrofit_folder(str(tmp_path / "run")) == tmp_path / "run"
    monkeypatch.setattr(hub, "ADAPTERS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="shipped retrofit 'smollm2-135m-instruct-dms-cr8' is missing"):
        shipped_retrofit("smollm2-135m-instruct-dms-cr8")


def test_a_run_continues_from_a_shipped_retrofit_by_name():
    """`dms retrofit --init-from smollm2-135m-instruct-dms-cr8`: the run starts from the shipped adapter."""
    from safetensors.torch import load_file

    from dms_runtime.retrofit.trainer import Retrofitter, RetrofitConfig

    from dms_runtime.retrofit.cli import init_lora_settings

    name = "smollm2-135m-instruct-dms-cr8"
    lm = dr.load("smollm2-135m-instruct", dms={"dms_separate_alpha": True, **init_lora_settings(name)}, merge_lora=False)
    Retrofitter(lm.model, RetrofitConfig(final_cr=8, initial_cr=8, window=128, init_from=name))
    shipped = load_file(str(shipped_retrofit(name) / "dms_weights.safetensors"))
    params = dict(lm.model.named_parameters())
    assert shipped and all(torch.equal(params[n], w.to(params[n].dtype)) for n, w in shipped.items())


@pytest.mark.parametrize("name,min_cr,max_kl", [("smollm2-135m-instruct-dms-cr2", 1.3, 0.04),
                                                ("smollm2-135m-instruct-dms-cr4", 2.2, 0.08),
                                                ("smollm2-135m-instruct-dms-cr8", 3.3, 0.12)])
def test_compresses_a_held_out_text(name, min_cr, max_kl):
    """At 1,024 tokens with a 128-token window the most a model can reach is about 1024 / (128 + ...);
    the bounds are loose regression bounds around the measured values in bench/RESULTS.md."""
    torch.set_num_threads(2)
    lm = dr.load(name)
    assert lm.config.dms.sink_tokens == 4  # the shipped settings keep the first 4 keys
    row = fidelity(lm, 1024, sequences=1)
    assert row.compression_ratio >= min_cr
    assert 0 < row.kl_per_token <= max_kl and row.greedy_agreement > 0.8


def test_vanilla_calibration_and_the_cr8_model_on_the_passkey():
    """The suite's calibration on the real base: vanilla answers the single passkey at 1K (so the
    task is informative there), and the CR 8 model, evicting, still does on the same cases
    (20/20 each in bench/RESULTS.md; three cases here, at depths 0, 0.5 and 1)."""
    from dms_runtime.retrofit.evaluate import RetrievalSuite

    torch.set_num_threads(2)
    lm = dr.load("smollm2-135m-instruct-dms-cr8")
    suite = RetrievalSuite(["passkey"], cases=3, seed=0)
    rows = {r.method: r for r in suite.run(lm, 1024, "cr8", "smollm2-135m-instruct")}
    assert rows["vanilla"].informative and rows["vanilla"].accuracy == 1.0
    assert rows["dms"].accuracy >= 2 / 3 and 0 < rows["dms"].held_fraction < 0.5
