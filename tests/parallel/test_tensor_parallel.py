"""Tensor parallelism on CPU (gloo): processes started here, each case bounded in time.

At TP 2, tiny random Llama / Qwen3 / Qwen2 models with 4 KV heads (borrowed channel and adapter)
give the same tokens and the same live-token counts per (layer, KV head) as TP 1 for chunked
prefill, decode, forks (sampled) and preemption; each rank's pool holds exactly its heads'
pages, and 1/N of TP 1's without eviction. The shipped SmolLM2 CR 8 retrofit (3 KV heads) at
TP 3 through `torchrun ... dms generate --tensor-parallel 3` gives TP 1's tokens.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import dms_runtime as dr
from dms_runtime import parallel
from dms_runtime.config import DMSConfig

sys.path.insert(0, str(Path(__file__).parent))
import tp_worker  # noqa: E402

HERE = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(HERE / "python"), str(HERE), os.environ.get("PYTHONPATH", "")])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_adapter(folder: Path, cfg: dict) -> None:
    """Random DMS adapter weights in the checkpoint (zero ones would evict nothing)."""
    path = folder / "model.safetensors"
    state = load_file(str(path))
    g = torch.Generator().manual_seed(3)
    h, kv = cfg["hidden_size"], cfg["num_key_value_heads"]
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}.self_attn.dms_proj_alpha"
        state[f"{pre}.weight"] = 0.05 * torch.randn(kv, h, generator=g)
        state[f"{pre}_norm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    save_file(state, str(path), metadata={"format": "pt"})


def _lora_copy(folder: Path, dest: Path) -> Path:
    """``folder`` plus a random rank-2 LoRA update of every projection (config and weights)."""
    import shutil

    shutil.copytree(folder, dest, dirs_exist_ok=True)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(dms_lora_rank=2, dms_lora_alpha=4.0)
    (dest / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(dest / "model.safetensors"))
    g = torch.Generator().manual_seed(4)
    for name in [n for n in state if n.endswith("_proj.weight") and "dms_proj_alpha" not in n]:
        out, inp = state[name].shape
        pre = name[: -len("weight")]
        state[pre + "dms_lora_a"] = torch.randn(2, inp, generator=g) / inp ** 0.5
        state[pre + "dms_lora_b"] = 0.3 * torch.randn(out, 2, generator=g)
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


CASES = [("llama", False), ("llama", True), ("qwen3", False), ("qwen3", True), ("qwen2", False)]
ALL = ("chunks_decode", "forks", "preemption")
SCENARIOS = {"qwen2-borrowed": ("chunks_decode",), "llama-vanilla": ("chunks_decode",)}  # q/k/v biases; 1/N exactly


@pytest.fixture(scope="module")
def tp2_results(tiny_factory, tmp_path_factory):
    cases = []
    for arch, adapter in CASES:
        dms = {"dms_window_size": 4, "dms_separate_alpha": adapter}
        folder, model = tiny_factory(arch=arch, num_key_value_heads=4, extra_config=dms)
        if adapter and not (folder / ".adapter").exists():
            _with_adapter(folder, json.loads((folder / "config.json").read_text()))
            (folder / ".adapter").touch()
        name = f"{arch}-{'adapter' if adapter else 'borrowed'}"
        cases.append((name, str(folder), None, SCENARIOS.get(name, ALL)))
    cases.append(("llama-vanilla", cases[0][1], {"dms_disable_eviction": True}, SCENARIOS["llama-vanilla"]))
    # a LoRA retrofit: each rank holds and merges its slice of the update (B by rows, A by columns)
    lora = _lora_copy(Path(cases[1][1]), tmp_path_factory.mktemp("lora") / "llama-lora")
    cases.append(("llama-lora", str(lora), None, ("chunks_decode",)))
    out = tmp_path_factory.mktemp("tp2")
    ctx = mp.start_processes(tp_worker.main, args=(2, _free_port(), cases, str(out), GENERATE), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 420  # a hung collective fails the test instead of the suite
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the TP 2 processes did not finish within 420 s")
    parts = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    merged = {name: {**parts[1].get(name, {}), **parts[0].get(name, {})} for name in parts[0]}
    return merged, parts[1]


NAMES = [f"{a}-{'adapter' if ad else 'borrowed'}" for a, ad in CASES]
GENERATE = ("llama-borrowed", "qwen3-adapter")  # generate() called on every rank (the engine path is shared)


TOKEN_CASES = [(n, s) for n in NAMES for s in SCENARIOS.get(n, ALL)] + [("llama-lora", "chunks_decode")]
PAGE_CASES = [(n, s) for n in NAMES + ["llama-vanilla"] for s in SCENARIOS.get(n, ALL) if s != "preemption"]


@pytest.mark.parametrize("name,scenario", TOKEN_CASES)
def test_tp2_same_tokens_and_live_counts(tp2_results, name, scenario):
    res = tp2_results[0][name]
    tp, tp1 = res["tp"][scenario], res["tp1"][scenario]
    assert res["heads"] == 4 and res["local_heads"] == 2
    assert tp["tokens"] == tp1["tokens"]
    assert tp["live"] == tp1["live"]  # [L][Hkv] per request, gathered from both ranks
    assert all(len(live[0]) == 4 for live in tp["live"])
    assert set(tp["reasons"]) == {"length"}
    if scenario == "chunks_decode":
        assert tp["prefill_steps"] > 3  # prompts of 13 + 20 + 5 tokens in chunks of 7
    if scenario == "forks":
        assert len(tp["tokens"]) == 6 and len({tuple(t) for t in tp["tokens"]}) > 2  # sampled, not all alike
    if scenario == "preemption":
        assert tp["preemptions"] > 0 and tp1["preemptions"] > 0


def test_tp2_lora_update_is_split_and_merged(tp2_results):
    """The LoRA case changes what is generated (its tokens differ from the same model without the
    update), and TP 2 gives TP 1's tokens (test_tp2_same_tokens_and_live_counts)."""
    res = tp2_results[0]
    assert res["llama-lora"]["tp1"]["chunks_decode"]["tokens"] != res["llama-adapter"]["tp1"]["chunks_decode"]["tokens"]


def test_an_older_engine_cannot_drive_the_followers(tp2_results):
    """The other ranks hold one engine's pools: an engine replaced by a newer one fails loudly."""
    assert "replaced by a newer Engine" in tp2_results[0]["llama-borrowed"]["replaced_engine_error"]


@pytest.mark.parametrize("name", NAMES)
def test_tp2_evicts(tp2_results, name):
    """The cases exercise eviction: some (layer, head) holds fewer tokens than it processed."""
    live = tp2_results[0][name]["tp"]["chunks_decode"]["live"]
    assert min(min(row) for per_req in live for row in per_req) < 13 + 8 - 1


@pytest.mark.parametrize("name,scenario", PAGE_CASES)
def test_each_rank_holds_its_heads_pages(tp2_results, name, scenario):
    """From the pools' own counters, after every step: rank r's pages in use equal the pages TP 1
    holds for rank r's KV heads; their sum is TP 1's; each pool is half of TP 1's."""
    res = tp2_results[0][name]
    tp, tp1 = res["tp"][scenario], res["tp1"][scenario]
    assert len(tp["pages"]) == len(tp1["pages"])  # the same schedule
    for ranks, ref in zip(tp["pages"], tp1["pages"]):
        assert ranks == ref[:2]
        assert sum(ranks) == ref[2]
    assert [s["pool_bytes"] * 2 for s in tp["pool"]] == [tp1["pool"][0]["pool_bytes"]] * 2
    assert [s["kv_heads"] for s in tp["pool"]] == [2, 2]
    if name == "llama-vanilla":  # nothing evicted: each rank holds exactly half
        assert all(2 * r == ref[2] for ranks, ref in zip(tp["pages"], tp1["pages"]) for r in ranks)
        assert max(tp["pages"])[0] > 0


@pytest.mark.parametrize("name", GENERATE)
def test_generate_on_every_rank_returns_rank0_result(tp2_results, name):
    merged, rank1 = tp2_results
    assert merged[name]["generate_rank0"] == rank1[name]["generate_rank1"] == merged[name]["generate_tp1"]


def test_split_errors_name_the_numbers(tiny_factory):
    from dms_runtime.models.loading import read_config
    from dms_runtime.models.registry import model_config_from_hf

    folder, _ = tiny_factory(arch="llama", num_key_value_heads=4, extra_config={"dms_window_size": 4})
    cfg = model_config_from_hf(read_config(folder))
    with pytest.raises(ValueError, match=r"tensor_parallel=3: .*num_key_value_heads=4 is not divisible by 3.*"
                                         r"num_attention_heads=8 is not divisible by 3"):
        parallel.check_divisible(cfg, 3)
    with pytest.raises(ValueError, match="intermediate_size=96 is not divisible by 5"):
        parallel.check_divisible(cfg.__class__(**{**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
                                                   "num_kv_heads": 5, "num_heads": 10}), 5)
    with pytest.raises(ValueError, match="dms_alpha_per='layer'"):
        import dataclasses

        parallel.check_divisible(dataclasses.replace(cfg, dms=DMSConfig(alpha_per="layer")), 2)
    # no torchrun around this process: the world does not have 2 ranks
    env_world = os.environ.pop("WORLD_SIZE", None)
    try:
        with pytest.raises(ValueError, match=r"tensor_parallel=2: needs 2 processes.*torchrun --nproc_per_node 2"):
            dr.load(folder, tensor_parallel=2)
    finally:
        if env_world is not None:
            os.environ["WORLD_SIZE"] = env_world
    with pytest.raises(ValueError, match="tensor_parallel: expected an int >= 1"):
        dr.load(folder, tensor_parallel=0)
    lm = dr.load(folder)
    with pytest.raises(ValueError, match=r"tensor_parallel=2: the model was loaded with tensor_parallel=1"):
        dr.generate(lm, [[1, 2, 3]], max_new_tokens=1, tensor_parallel=2)
    with pytest.raises(ValueError, match=r"tensor_parallel=2: the model was loaded whole"):
        dr.Engine(lm.model, tensor_parallel=2)
    with pytest.raises(ValueError, match=r"defer_budget=8: deferred eviction .* give defer_budget=0"):
        dr.Engine(lm.model, dr.PagedConfig(defer_budget=8), tensor_parallel=2)


def test_world_size_mismatch_fails_at_start(tiny_factory, monkeypatch, capsys):
    """A job of 2 processes (as torchrun sets it) asked for --tensor-parallel 4 stops before any
    rendezvous, naming both numbers."""
    from dms_runtime.cli import main

    folder, _ = tiny_factory(arch="llama", num_key_value_heads=4, extra_config={"dms_window_size": 4})
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["generate", "-m", str(folder), "--tensor-parallel", "4", "-n", "2", "--no-chat", "hi"]) == 2
    assert "tensor_parallel=4: the job has WORLD_SIZE=2 processes" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_cr8_tp3_matches_tp1(smollm2_folder, tmp_path):
    """The shipped CR 8 retrofit (3 KV heads, 9 query heads, MLP 1536) over 3 gloo processes."""
    name, prompt, n = "smollm2-135m-instruct-dms-cr8", "Name three colours.", 4
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port",
           str(_free_port()), "-m", "dms_runtime.cli", "generate", "-m", name, "--tensor-parallel", "3",
           "-n", str(n), "--ignore-eos", "--json", prompt]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    tp3 = json.loads(run.stdout)  # rank 0 alone prints
    one = dr.generate(dr.load(name), [prompt], max_new_tokens=n, ignore_eos=True)
    assert tp3["token_ids"] == one.token_ids
    live3, live1 = tp3["stats"]["kv"]["live_per_layer_head"], one.stats.kv.live_per_layer_head
    assert len(live3) == 30 and all(len(row) == 3 for row in live3)  # gathered from the 3 ranks
    # float32 sums in another order may flip a decision sitting at logit 0; tokens are the contract
    assert abs(sum(map(sum, live3)) - sum(map(sum, live1))) <= 0.02 * sum(map(sum, live1))
    # each rank's pool is a third of TP 1's (the pools' own sizes), and holds about a third of its bytes
    ranks, ex1 = tp3["stats"]["extra"]["ranks"], one.stats.extra
    pool1 = ex1["num_pages"] * ex1["page_size"] * 2 * 64 * 4  # pages * tokens * (K + V) * D * fp32
    assert [r["kv_heads"] for r in ranks] == [1, 1, 1]
    assert [3 * r["pool_bytes"] for r in ranks] == [pool1] * 3
    assert abs(sum(r["peak_bytes"] for r in ranks) - ex1["pool_peak_bytes"]) <= 0.02 * ex1["pool_peak_bytes"]
