"""``dms generate`` prints answers and a stats line, or JSON; bad input exits 2 with a message."""

import json
import subprocess
import sys

import pytest

from dms_runtime.cli import main


def test_generate_json(tiny_with_tokenizer, capsys):
    rc = main(["generate", "--model", str(tiny_with_tokenizer), "--json", "-n", "5", "--ignore-eos",
               "--prompt", "Hi", "A second, longer prompt"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["texts"]) == 2 and all(len(ids) == 5 for ids in out["token_ids"])
    assert out["stats"]["generated_tokens"] == 10
    assert out["stats"]["kv"]["compression_ratio"] == 1.0
    assert "eviction off" in out["notice"]


def test_generate_text_with_dms_window(tiny_with_tokenizer, capsys):
    rc = main(["generate", "-m", str(tiny_with_tokenizer), "-n", "4", "--dms-window", "2", "Hello"])
    out = capsys.readouterr().out
    assert rc == 0 and ">>> Hello" in out and "[stats]" in out and "DMS eviction on (window 2)" in out


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["generate", "-m", str(tmp_path / "missing"), "x"]) == 2
    assert "neither an embedded model" in capsys.readouterr().err
    assert main(["generate", "-m", str(tmp_path)]) == 2
    assert "at least one prompt" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "dms_runtime.cli", "generate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--max-new-tokens" in out.stdout


def test_stream_and_samples(tiny_with_tokenizer, capsys):
    rc = main(["generate", "-m", str(tiny_with_tokenizer), "-n", "3", "--ignore-eos", "--stream", "Hi"])
    assert rc == 0 and capsys.readouterr().out.strip()
    rc = main(["generate", "-m", str(tiny_with_tokenizer), "-n", "3", "--ignore-eos", "--samples", "2",
               "--temperature", "1.0", "--seed", "3", "--json", "Hi"])
    out = json.loads(capsys.readouterr().out)
    from dms_kernels import cpu

    assert rc == 0 and len(out["texts"]) == 2 and out["stats"]["backend"] == ("paged/cpu" if cpu.built() else "paged/torch")


def test_reference_backend_from_the_cli(tiny_with_tokenizer, capsys):
    rc = main(["generate", "-m", str(tiny_with_tokenizer), "-n", "2", "--backend", "oracle", "--json", "Hi"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["stats"]["backend"] == "oracle"


def test_deferred_eviction_from_the_cli(tiny_with_tokenizer, capsys):
    common = ["generate", "-m", str(tiny_with_tokenizer), "-n", "12", "--ignore-eos", "--no-chat", "--dms-window", "2",
              "--dms-offset", "0", "--json", "A prompt that is long enough for the window to matter here"]
    assert main(common) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(common + ["--defer-budget", "1000"]) == 0
    deferred = json.loads(capsys.readouterr().out)
    assert deferred["stats"]["extra"]["defer_budget"] == 1000 and plain["stats"]["extra"]["defer_budget"] == 0
    # a pool bigger than the sequence: nothing leaves, so every position is held
    assert deferred["stats"]["kv"]["live_tokens"] == deferred["stats"]["kv"]["dense_tokens"]
    assert plain["stats"]["kv"]["live_tokens"] < plain["stats"]["kv"]["dense_tokens"]
    assert main(common + ["--defer-budget", "8", "--backend", "oracle"]) == 2
    assert "--defer-budget needs the paged backend" in capsys.readouterr().err
