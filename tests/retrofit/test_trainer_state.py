"""The trainer state holds no pickle: a crafted state file cannot run code, saves are atomic and
consistent, and `dms retrofit` does not train over an earlier retrofit unless told to."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from dms_runtime.cli import main
from dms_runtime.models import load_model
from dms_runtime.retrofit import RetrofitConfig, Retrofitter


class RunsCode:
    """Unpickling this object calls ``open(path, "w")``: the marker file appears if code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def adapter_model(tiny_factory):
    folder, _ = tiny_factory(arch="llama", extra_config={"dms_window_size": 2, "dms_separate_alpha": True})
    return folder


def trained(folder, steps=2):
    model, _ = load_model(folder)
    tr = Retrofitter(model, RetrofitConfig(final_cr=4, steps_per_cr=2, window=2, lr=0.05, warmup_steps=1, seed=2))
    for _ in range(steps):
        tr.step(torch.randint(0, 131, (2, 12)))
    return tr


def fresh(folder):
    model, _ = load_model(folder)
    return Retrofitter(model, RetrofitConfig(final_cr=4, steps_per_cr=2, window=2, lr=0.05, warmup_steps=1, seed=2))


def test_the_payload_would_run_code_if_unpickled(tmp_path):
    """The control: what the tests below feed the trainer does run code through pickle."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(RunsCode(marker)))
    assert marker.exists()


@pytest.mark.parametrize("how", ["raw-pickle", "torch-save"])
def test_a_pickled_legacy_state_is_refused_unread(adapter_model, tmp_path, how):
    ckpt = tmp_path / "ckpt"
    trained(adapter_model).save(ckpt)
    (ckpt / "trainer_state.json").unlink()
    (ckpt / "trainer_state.safetensors").unlink()
    marker = tmp_path / "ran"
    if how == "raw-pickle":
        (ckpt / "trainer_state.pt").write_bytes(pickle.dumps({"step": 1, "x": RunsCode(marker)}))
    else:
        torch.save({"step": 1, "x": RunsCode(marker)}, ckpt / "trainer_state.pt")
    with pytest.raises(ValueError, match=r"trainer_state.pt: a trainer state in the old pickle format, not read"):
        fresh(adapter_model).resume(ckpt)
    assert not marker.exists()


def test_a_pickle_in_place_of_the_state_tensors_cannot_run_code(adapter_model, tmp_path):
    ckpt = tmp_path / "ckpt"
    trained(adapter_model).save(ckpt)
    marker = tmp_path / "ran"
    (ckpt / "trainer_state.safetensors").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(ValueError, match="trainer_state.safetensors: not a readable safetensors file"):
        fresh(adapter_model).resume(ckpt)
    assert not marker.exists()


def test_the_cli_refuses_a_crafted_state_with_one_line(tiny_with_tokenizer, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "ran"
    (out / "trainer_state.pt").write_bytes(pickle.dumps(RunsCode(marker)))
    rc = main(["retrofit", "-m", str(tiny_with_tokenizer), "--out", str(out), "--resume", "--steps", "1",
               "--window", "4", "--seq-len", "16", "--batch", "1", "--data", "synthetic"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "old pickle format" in err and not marker.exists()


def test_save_is_pickle_free_atomic_and_round_trips(adapter_model, tmp_path):
    tr = trained(adapter_model, steps=3)
    ckpt = tr.save(tmp_path / "ckpt")
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["dms_config.json", "dms_weights.safetensors", "trainer_state.json", "trainer_state.safetensors"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["config"]["final_cr"] == 4
    tensors = load_file(ckpt / "trainer_state.safetensors")
    assert tensors["generator"].dtype == torch.uint8
    back = fresh(adapter_model)
    back.resume(ckpt)
    assert back.step_count == 3
    assert torch.equal(back.generator.get_state(), tr.generator.get_state())
    a, b = tr.opt.state_dict(), back.opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k]), (i, k)


def test_an_interrupted_save_is_caught_on_resume(adapter_model, tmp_path):
    ckpt = tmp_path / "ckpt"
    tr = trained(adapter_model)
    tr.save(ckpt)
    older = load_file(ckpt / "dms_weights.safetensors")
    tr.step(torch.randint(0, 131, (2, 12)))
    tr.save(ckpt)
    save_file(older, str(ckpt / "dms_weights.safetensors"), metadata={"step": "2"})  # as if the last save stopped
    with pytest.raises(ValueError, match="trainer_state.json is at step 3, .* dms_weights.safetensors at 2; the "
                                         "checkpoint is inconsistent"):
        fresh(adapter_model).resume(ckpt)


def test_retrofit_out_is_not_overwritten_by_accident(tiny_with_tokenizer, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["retrofit", "-m", str(tiny_with_tokenizer), "--out", str(out), "--window", "4", "--seq-len", "16",
              "--batch", "1", "--data", "synthetic", "--lr", "0.05", "--warmup", "1", "--cr", "2"]
    assert main(common + ["--steps", "2"]) == 0
    weights = (out / "dms_weights.safetensors").read_bytes()
    capsys.readouterr()
    for extra in (["--steps", "-1"], ["--steps", "1"]):  # a bad number, or a fresh run over the folder
        try:
            rc = main(common + extra)
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err
        assert (out / "dms_weights.safetensors").read_bytes() == weights
    assert main(common + ["--steps", "1", "--overwrite"]) == 0
    log = (out / "log.jsonl").read_text().splitlines()
    assert len(log) == 1 and json.loads(log[0])["step"] == 1  # a new run, not appended to the old log
    assert not list(out.glob(".*tmp*"))


def test_the_cli_refuses_a_decay_longer_than_the_run(tiny_with_tokenizer, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["retrofit", "-m", str(tiny_with_tokenizer), "--out", str(out), "--window", "4", "--seq-len", "16",
               "--batch", "1", "--data", "synthetic", "--cr", "2", "--steps", "2", "--decay", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "--decay: expected at most --steps=2, got 3" in err and "Traceback" not in err, err
    assert not out.exists()  # refused before the folder is made
