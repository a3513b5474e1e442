"""`dms retrofit` end to end (tiny model, resumable, loadable by dms_runtime.load), and data
parallelism: two gloo processes keep identical weights; torchrun runs the same command."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import dms_runtime as dr
from dms_runtime.cli import main


def test_retrofit_cli_saves_resumes_and_loads(tiny_with_tokenizer, tmp_path, capsys):
    out = tmp_path / "retro"
    common = ["retrofit", "-m", str(tiny_with_tokenizer), "--out", str(out), "--cr", "2", "--steps-per-cr", "2",
              "--window", "4", "--seq-len", "48", "--batch", "2", "--data", "synthetic", "--lr", "0.05", "--warmup", "1"]
    assert main(common + ["--steps", "3"]) == 0
    assert main(common + ["--steps", "5", "--resume"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]  # resumed at step 4
    settings = json.loads((out / "dms_config.json").read_text())
    assert settings["base_model"] == str(tiny_with_tokenizer) and settings["dms_window_size"] == 4
    lm = dr.load(out)
    assert lm.config.dms_active and lm.config.dms.separate_alpha
    w = lm.model.model.layers[0].self_attn.dms_proj_alpha.weight
    assert w.abs().sum() > 0  # trained, not the zero initialisation
    res = dr.generate(lm, ["Hello"], max_new_tokens=4, ignore_eos=True, chat=False)
    assert len(res.token_ids[0]) == 4


def test_retrofit_cli_lora(tiny_with_tokenizer, tmp_path, capsys):
    out = tmp_path / "lora"
    common = ["retrofit", "-m", str(tiny_with_tokenizer), "--out", str(out), "--cr", "2", "--steps-per-cr", "2",
              "--window", "4", "--seq-len", "32", "--batch", "1", "--data", "synthetic", "--warmup", "1",
              "--lora-rank", "2", "--lora-alpha", "4", "--lora-targets", "v_proj", "up_proj", "--lora-lr", "0.01"]
    assert main(common + ["--steps", "2"]) == 0
    settings = json.loads((out / "dms_config.json").read_text())
    assert (settings["dms_lora_rank"], settings["dms_lora_alpha"], settings["dms_lora_targets"]) == (2, 4.0, ["v_proj", "up_proj"])
    weights = load_file(str(out / "dms_weights.safetensors"))
    assert weights["model.layers.1.mlp.up_proj.dms_lora_b"].abs().sum() > 0  # trained from zero
    lm = dr.load(out)
    assert lm.config.dms.lora_rank == 2
    torch.testing.assert_close(lm.model.model.layers[1].mlp.up_proj.dms_lora_b,
                               weights["model.layers.1.mlp.up_proj.dms_lora_b"])
    # --init-from a LoRA retrofit continues its update (rank, alpha, targets) without the flags
    on = tmp_path / "continued"
    assert main(["retrofit", "-m", str(tiny_with_tokenizer), "--out", str(on), "--init-from", str(out), "--cr-start", "2",
                 "--cr", "2", "--window", "4", "--seq-len", "32", "--batch", "1", "--data", "synthetic", "--steps", "1",
                 "--checkpoint-layers"]) == 0
    again = json.loads((on / "dms_config.json").read_text())
    assert (again["dms_lora_rank"], again["dms_lora_alpha"], again["dms_lora_targets"]) == (2, 4.0, ["v_proj", "up_proj"])
    assert again["retrofit"]["checkpoint_layers"] is True and settings["retrofit"]["checkpoint_layers"] is False
    capsys.readouterr()
    assert main(["retrofit", "-m", str(tiny_with_tokenizer), "--out", str(tmp_path / "bad"), "--lora-rank", "2",
                 "--lora-targets", "w_proj", "--steps", "1"]) == 2
    assert "dms_lora_targets: expected distinct names" in capsys.readouterr().err
    assert main(["retrofit", "-m", str(tiny_with_tokenizer), "--out", str(tmp_path / "bad2"), "--lora-targets", "q_proj",
                 "--steps", "1"]) == 2
    assert "--lora-targets: give --lora-rank too" in capsys.readouterr().err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, folder, result_dir):
    import torch.distributed as dist

    from dms_runtime.models import load_model
    from dms_runtime.retrofit import RetrofitConfig, Retrofitter

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # different data on each rank
    model, _ = load_model(folder)
    tr = Retrofitter(model, RetrofitConfig(final_cr=4, steps_per_cr=2, window=2, lr=0.05, warmup_steps=1))
    for _ in range(3):
        tr.step(torch.randint(0, 131, (2, 16)))
    w = torch.cat([p.detach().flatten() for p in tr.params])
    gathered = [torch.zeros_like(w) for _ in range(world)]
    dist.all_gather(gathered, w)
    save_file({"weights": torch.stack(gathered), "changed": torch.tensor(bool(w.abs().sum() > 0))},
              os.path.join(result_dir, f"{rank}.safetensors"))
    dist.destroy_process_group()


def test_two_gloo_processes_keep_identical_weights(tiny_factory, tmp_path):
    folder, _ = tiny_factory(arch="llama", extra_config={"dms_window_size": 2, "dms_separate_alpha": True})
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(folder), str(tmp_path)), nprocs=2, join=True)
    res = load_file(tmp_path / "0.safetensors")
    assert bool(res["changed"])
    assert torch.equal(res["weights"][0], res["weights"][1])  # gradients were averaged across ranks


def test_torchrun_runs_the_same_command(tiny_with_tokenizer, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "dms_runtime.cli", "retrofit", "-m", str(tiny_with_tokenizer), "--out", str(out), "--steps", "2",
           "--cr", "2", "--window", "4", "--seq-len", "32", "--batch", "1", "--data", "synthetic"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "dms_weights.safetensors").is_file()
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
