"""A catalogue of bad inputs through the API, the engine, the loaders and the CLI: each fails with
an error naming the argument (the CLI with one line on stderr and exit 2, no traceback), and a
valid call afterwards makes the same tokens as before."""

import json
import math
import re
import shutil
import struct
import subprocess
import sys

import pytest
import torch

import dms_runtime as dr
from dms_runtime import Engine, PagedConfig, SamplingParams
from dms_runtime.cli import main

EVICTING = {"dms_window_size": 3, "dms_initial_alpha_offset": 0.0}
PROMPT = [5, 6, 7, 8, 9, 10, 11]
GOOD = dict(max_new_tokens=3, ignore_eos=True, temperature=0.8, top_k=20, seed=3)


@pytest.fixture(scope="module")
def folder(tiny_factory):
    return tiny_factory(arch="llama", extra_config=EVICTING)[0]


@pytest.fixture(scope="module")
def lm(folder):
    return dr.load(folder)


@pytest.fixture(scope="module")
def baseline(lm):
    tokens = dr.generate(lm, [PROMPT], **GOOD).token_ids
    assert dr.generate(lm, [PROMPT], backend="oracle", **GOOD).token_ids == tokens
    return tokens


@pytest.fixture
def still_good(lm, baseline):
    """After the bad call: the same model makes the same tokens (sampled: a lost generator would show).
    The reference backend is the cheaper check; the engine tests run the paged one."""
    yield
    assert dr.generate(lm, [PROMPT], backend="oracle", **GOOD).token_ids == baseline


def mutated(**changes):
    p = SamplingParams(max_new_tokens=3)
    for k, v in changes.items():
        setattr(p, k, v)  # after creation: generate() and add_request must check again
    return p


def paged(**changes):
    c = PagedConfig()
    for k, v in changes.items():
        setattr(c, k, v)
    return c


# ---------------------------------------------------------------------- generate()

GENERATE = [
    (dict(temperature=math.inf), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature="0.5"), "temperature"),
    (dict(top_p=math.nan), "top_p"),
    (dict(top_k=True), "top_k"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(max_new_tokens=10**9), "max_new_tokens"),
    (dict(seed="1"), "seed"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(stop=5), "stop"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[True]), "stop_token_ids"),
    (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(ignore_eos="yes"), "ignore_eos"),
    (dict(n=0), "n: "),
    (dict(n=True), "n: "),
    (dict(n=10**9), "n: "),
    (dict(params={"max_new_tokens": 3}), "params"),
    (dict(params=mutated(temperature=math.nan)), "temperature"),
    (dict(params=mutated(seed="7")), "seed"),
    (dict(params=mutated(max_new_tokens=True)), "max_new_tokens"),
    (dict(paged={"page_size": 4}), "paged"),
    (dict(paged=paged(page_size=0)), "page_size"),
    (dict(paged=paged(max_seqs=True)), "max_seqs"),
    (dict(paged=paged(num_pages=2**40)), "num_pages"),
    (dict(paged=paged(attention=3)), "attention"),
    (dict(chat="no"), "chat"),
    (dict(prompts=[[1, True]]), r"prompts\[0\]"),
    (dict(prompts=[[1, 2.0]]), r"prompts\[0\]"),
    (dict(prompts="hello"), "prompts"),
    (dict(prompts=[PROMPT, [1, 131]]), r"prompts\[1\]"),
]


@pytest.mark.parametrize("kwargs,match", GENERATE, ids=[f"generate-{i}" for i in range(len(GENERATE))])
def test_generate_refuses(lm, still_good, kwargs, match):
    kwargs = dict(kwargs)
    prompts = kwargs.pop("prompts", [PROMPT])
    if "params" not in kwargs:
        kwargs.setdefault("max_new_tokens", 3)
    with pytest.raises(ValueError, match=match):
        dr.generate(lm, prompts, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(num_pages=2**30), dict(kv_memory_bytes=10**15)])
def test_a_pool_too_large_fails_before_allocating_with_the_bytes(lm, still_good, kwargs):
    with pytest.raises(ValueError, match=r"paged cache \(num_pages=.*needs .* bytes\) on cpu, but only .* bytes\) "
                                         r"are available"):
        dr.generate(lm, [PROMPT], max_new_tokens=2, paged=PagedConfig(**kwargs))


# ---------------------------------------------------------------------- load()

LOAD = [
    (dict(dms={"dms_alpha_scale": math.nan}), "dms_alpha_scale"),
    (dict(dms={"dms_alpha_scale": math.inf}), "dms_alpha_scale"),
    (dict(dms={"dms_initial_alpha_offset": math.nan}), "dms_initial_alpha_offset"),
    (dict(dms={"dms_disable_eviction": "no"}), "dms_disable_eviction"),
    (dict(dms={"dms_separate_alpha": 1}), "dms_separate_alpha"),
    (dict(dms={"dms_window_size": 10**9}), "dms_window_size"),
    (dict(dms={"dms_window_size": True}), "dms_window_size"),
    (dict(dms={"dms_window_size": "256"}), "dms_window_size"),
    (dict(dms={"dms_tau": 0.0}), "dms_tau"),
    (dict(dms={"dms_cr": math.inf}), "dms_cr"),
    (dict(dms=5), "dms"),
    (dict(device="gpu"), "device"),
    (dict(device="cuda:banana"), "device"),
    (dict(device=3), "device"),
    (dict(dtype=torch.int32), "dtype"),
    (dict(dtype="int8"), "dtype"),
    (dict(name_or_path=5), "name_or_path"),
]


@pytest.mark.parametrize("kwargs,match", LOAD, ids=[f"load-{i}" for i in range(len(LOAD))])
def test_load_refuses(folder, still_good, kwargs, match):
    kwargs = dict(kwargs)
    where = kwargs.pop("name_or_path", folder)
    with pytest.raises(ValueError, match=match):
        dr.load(where, **kwargs)


def test_a_huge_window_neither_hangs_nor_allocates(folder, still_good):
    """A window longer than any sequence keeps every token: the ring is capped at max_model_len."""
    wide = dr.load(folder, dms={"dms_window_size": 10**6})
    longer = dr.load(folder, dms={"dms_window_size": 64})  # also longer than prompt + new tokens
    args = dict(max_new_tokens=6, ignore_eos=True)
    out = dr.generate(wide, [PROMPT], **args).token_ids
    assert out == dr.generate(longer, [PROMPT], **args).token_ids
    assert out == dr.generate(wide, [PROMPT], backend="oracle", **args).token_ids
    engine = Engine(wide.model, PagedConfig(page_size=4, max_seqs=2))
    assert engine.cache.w == wide.config.max_position_embeddings


# ---------------------------------------------------------------------- Engine

ENGINE = [
    (lambda e: e.add_request([1, True]), "prompt_ids"),
    (lambda e: e.add_request("hello"), "prompt_ids"),
    (lambda e: e.add_request([]), "prompt_ids"),
    (lambda e: e.add_request([1, 131]), "prompt_ids"),
    (lambda e: e.add_request([1, 2], n=True), "n: "),
    (lambda e: e.add_request([1, 2], n=2.0), "n: "),
    (lambda e: e.add_request([1, 2], params={"max_new_tokens": 2}), "params"),
    (lambda e: e.add_request([1, 2], params=mutated(top_k=-1)), "top_k"),
    (lambda e: e.add_request([1, 2], params=mutated(temperature=math.inf)), "temperature"),
    (lambda e: e.add_request([1, 2], params=mutated(stop=5)), "stop"),
    (lambda e: Engine(e.model, {"page_size": 4}), "config"),
    (lambda e: Engine(e.model, paged(max_seqs=0)), "max_seqs"),
    (lambda e: Engine(e.model, paged(page_size=10**9)), "page_size"),
    (lambda e: Engine(e.model, paged(prefill_chunk=1.5)), "prefill_chunk"),
]


@pytest.mark.parametrize("call,match", ENGINE, ids=[f"engine-{i}" for i in range(len(ENGINE))])
def test_engine_refuses_and_keeps_serving(lm, baseline, still_good, call, match):
    engine = Engine(lm.model, PagedConfig(page_size=4, max_seqs=4), eos_ids=lm.eos_ids)
    with pytest.raises(ValueError, match=match):
        call(engine)
    assert not engine.has_unfinished()
    rid = engine.add_request(PROMPT, SamplingParams(**GOOD))[0]
    engine.run()
    assert engine.outputs[rid].token_ids == baseline[0]


def test_a_dms_setting_changed_after_loading_is_checked_by_the_engine(folder, still_good):
    lm = dr.load(folder)
    lm.config.dms.alpha_scale = math.nan
    with pytest.raises(ValueError, match="dms_alpha_scale"):
        Engine(lm.model, PagedConfig())


# ---------------------------------------------------------------------- loaders: broken files


def _copy(folder, dst):
    shutil.copytree(folder, dst)
    return dst


def _break_config_json(d):
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')


def _config_json_list(d):
    (d / "config.json").write_text("[1, 2]")


def _config_dms(**changes):
    def edit(d):
        raw = json.loads((d / "config.json").read_text())
        raw.update(changes)
        (d / "config.json").write_text(json.dumps(raw))  # json writes NaN as the literal NaN
    return edit


def _garbage_safetensors(d):
    (d / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)


def _truncated_safetensors(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _broken_index(d):
    (d / "model.safetensors.index.json").write_text("{not json")


LOADERS = [
    (_break_config_json, r"config.json: invalid JSON"),
    (_config_json_list, r"config.json: expected a JSON object"),
    (_config_dms(dms_window_size="256"), r"config.json: dms_window_size"),
    (_config_dms(dms_alpha_scale=math.nan), r"config.json: dms_alpha_scale"),
    (_config_dms(dms_disable_eviction="no"), r"config.json: dms_disable_eviction"),
    (_config_dms(hidden_size="64"), r"config.json: .*hidden_size"),
    (_config_dms(num_attention_heads=0), r"config.json: "),
    (_config_dms(num_hidden_layers=-1), r"config.json: num_hidden_layers: expected an int >= 1"),
    (_config_dms(rms_norm_eps=-1.0), r"config.json: rms_norm_eps"),
    (_garbage_safetensors, r"model.safetensors: not a readable safetensors file"),
    (_truncated_safetensors, r"model.safetensors: (not a readable safetensors file|tensor .* cannot be read)"),
    (_broken_index, r"model.safetensors.index.json: invalid JSON"),
]


@pytest.mark.parametrize("damage,match", LOADERS, ids=[f"loader-{i}" for i in range(len(LOADERS))])
def test_broken_model_files_are_named(folder, tmp_path, still_good, damage, match):
    d = _copy(folder, tmp_path / "m")
    damage(d)
    with pytest.raises(ValueError, match=match):
        dr.load(d)


def test_a_truncated_gguf_is_named_without_a_struct_error(tmp_path, still_good, monkeypatch):
    monkeypatch.setenv("DMS_CACHE_DIR", str(tmp_path / "cache"))
    for i, data in enumerate([b"GGUF\x03\x00", b"GGUF\x03\x00\x00\x00" + struct.pack("<QQ", 1, 1) + b"\x05"]):
        path = tmp_path / f"cut{i}.gguf"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=f"gguf_path: cannot read .*cut{i}.gguf.* truncated or corrupt"):
            dr.load(path)


def _retrofit(folder, tmp_path):
    """A retrofit folder (adapter weights + settings) on top of ``folder``."""
    from safetensors.torch import save_file

    base = dr.load(folder, dms={"dms_separate_alpha": True})
    out = tmp_path / "retro"
    out.mkdir()
    weights = {n: p.detach().clone() for n, p in base.model.named_parameters() if ".dms_proj_alpha" in n}
    save_file(weights, str(out / "dms_weights.safetensors"))
    (out / "dms_config.json").write_text(json.dumps({"base_model": str(folder), "dms_separate_alpha": True,
                                                     "dms_window_size": 3}))
    return out, weights


def test_broken_retrofit_files_are_named(folder, tmp_path, still_good):
    from safetensors.torch import save_file

    out, weights = _retrofit(folder, tmp_path)
    assert dr.load(out).config.dms.separate_alpha  # the intact folder loads
    name = next(iter(weights))
    save_file({**weights, name: torch.zeros(3, 3)}, str(out / "dms_weights.safetensors"))
    with pytest.raises(ValueError, match=f"dms_weights.safetensors: weight '{name}' has shape \\(3, 3\\)"):
        dr.load(out)
    (out / "dms_weights.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="dms_weights.safetensors: not a readable safetensors file"):
        dr.load(out)
    (out / "dms_config.json").write_text('{"base_model": ')
    with pytest.raises(ValueError, match="dms_config.json: invalid JSON"):
        dr.load(out)
    (out / "dms_config.json").write_text(json.dumps({"base_model": str(folder), "dms_tau": "hot"}))
    with pytest.raises(ValueError, match="dms_config.json: dms_tau"):
        dr.load(out)


# ---------------------------------------------------------------------- command line


def run_cli(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's exit
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.err


CLI = [
    (["generate", "--temperature", "inf", "x"], "argument --temperature/-t: expected a finite number >= 0"),
    (["generate", "--temperature", "nan", "x"], "argument --temperature/-t"),
    (["generate", "--max-new-tokens", "0", "x"], "argument --max-new-tokens/-n: expected an int >= 1"),
    (["generate", "--seed", "abc", "x"], "argument --seed: expected an int"),
    (["generate", "--top-p", "1.5", "x"], "argument --top-p"),
    (["generate", "--top-k", "-2", "x"], "argument --top-k"),
    (["generate", "--samples", "0", "x"], "argument --samples"),
    (["generate", "--page-size", "0", "x"], "argument --page-size"),
    (["generate", "--dms-window", "1000000000", "x"], "argument --dms-window: expected an int >= 1 and <= 1048576"),
    (["generate", "--dtype", "int8", "x"], "argument --dtype"),
    (["generate", "--device", "gpu", "-m", "{folder}", "x"], "device: expected 'cpu'"),
    (["generate", "-m", "{broken}", "x"], "config.json: invalid JSON"),
    (["generate", "-m", "{tmp}/nothing-here", "x"], "neither an embedded model"),
    (["retrofit", "--out", "{tmp}/o", "--steps", "-1"], "argument --steps: expected an int >= 0, got '-1'"),
    (["retrofit", "--out", "{tmp}/o", "--steps", "1.5"], "argument --steps"),
    (["retrofit", "--out", "{tmp}/o", "--cr", "0.5"], "argument --cr: expected a finite number >= 1"),
    (["retrofit", "--out", "{tmp}/o", "--lr", "0"], "argument --lr: expected a finite number > 0"),
    (["retrofit", "--out", "{tmp}/o", "--lr", "nan"], "argument --lr"),
    (["retrofit", "--out", "{tmp}/o", "--batch", "0"], "argument --batch"),
    (["retrofit", "--out", "{tmp}/o", "--seq-len", "0"], "argument --seq-len"),
    (["retrofit", "--out", "{tmp}/o", "--window", "0"], "argument --window"),
    (["retrofit", "--out", "{tmp}/o", "--tau", "-1"], "argument --tau"),
    (["retrofit", "--out", "{tmp}/o", "--save-every", "0"], "argument --save-every"),
    (["retrofit", "--out", "{tmp}/o", "--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
    (["retrofit", "--out", "{tmp}/o", "--cr", "2", "--cr-start", "4", "-m", "{tmp}/none"], "--cr-start: expected at most --cr=2"),
    (["retrofit", "--out", "{full}", "-m", "{tmp}/none"], "--out: .* exists and is not empty; pass --resume .* or --overwrite"),
    (["retrofit", "--out", "{full}/dms_config.json", "-m", "{tmp}/none"], "--out: .* exists and is not a folder"),
    (["retrofit", "--out", "{full}", "--resume", "-m", "{tmp}/none"], "--resume: .* holds no trainer state"),
    (["eval", "-m", "x", "--lengths", "0"], "argument --lengths"),
    (["eval", "-m", "x", "--sequences", "-1"], "argument --sequences"),
    (["eval", "-m", "x", "--passkey-trials", "-1"], "argument --passkey-trials"),
    (["eval", "-m", "x", "--dms-window", "0"], "argument --dms-window"),
    (["eval", "-m", "x", "--dms-sinks", "-1"], "argument --dms-sinks: expected an int >= 0"),
    (["generate", "--dms-sinks", "x", "x"], "argument --dms-sinks"),
    (["generate", "--dms-offset", "nan", "x"], "argument --dms-offset: expected a finite number >= -1000"),
    (["eval", "-m", "x", "--dms-offset", "1e9"], "argument --dms-offset"),
    (["eval", "-m", "x", "--match", "peak"], "argument --match: invalid choice: 'peak'"),
    (["retrofit", "--out", "{tmp}/o", "--sinks", "-2"], "argument --sinks"),
]


@pytest.mark.parametrize("argv,match", CLI, ids=[f"cli-{i}" for i in range(len(CLI))])
def test_cli_prints_one_line_and_exits_2(folder, tmp_path, capsys, still_good, argv, match):
    broken = _copy(folder, tmp_path / "broken")
    _break_config_json(broken)
    full = tmp_path / "full"
    full.mkdir()
    (full / "dms_config.json").write_text("{}")
    subs = {"{folder}": str(folder), "{broken}": str(broken), "{tmp}": str(tmp_path), "{full}": str(full)}
    argv = [next((a.replace(k, v) for k, v in subs.items() if k in a), a) for a in argv]
    rc, err = run_cli(argv, capsys)
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err
    assert (full / "dms_config.json").read_text() == "{}"  # nothing written over
    assert not (tmp_path / "o").exists()


def test_a_valid_cli_call_afterwards_gives_the_api_tokens(tiny_with_tokenizer, capsys):
    rc, _ = run_cli(["generate", "-m", str(tiny_with_tokenizer), "--temperature", "inf", "Hi"], capsys)
    assert rc == 2
    args = ["-n", "4", "--ignore-eos", "--temperature", "0.8", "--top-k", "20", "--seed", "3"]
    assert main(["generate", "-m", str(tiny_with_tokenizer), "--json", *args, "Hi"]) == 0
    out = json.loads(capsys.readouterr().out)
    api = dr.generate(dr.load(tiny_with_tokenizer), ["Hi"], max_new_tokens=4, ignore_eos=True, temperature=0.8,
                      top_k=20, seed=3)
    assert out["token_ids"] == api.token_ids


def test_the_console_script_prints_no_traceback(folder, tmp_path):
    broken = _copy(folder, tmp_path / "broken")
    _break_config_json(broken)
    run = subprocess.run([sys.executable, "-m", "dms_runtime.cli", "generate", "-m", str(broken), "hi"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and "config.json: invalid JSON" in run.stderr


def test_a_broken_tokenizer_is_named(tiny_with_tokenizer, tmp_path, still_good):
    d = _copy(tiny_with_tokenizer, tmp_path / "t")
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')
    with pytest.raises(ValueError, match="the tokenizer cannot be loaded"):
        dr.load(d)
