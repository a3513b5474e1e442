"""Bad settings of ``dms serve`` fail before the model loads, naming the setting and what it expects."""

from __future__ import annotations

import pytest

from dms_runtime.cli import main
from dms_runtime.serve import ServeConfig


@pytest.mark.parametrize("argv, words", [
    (["serve", "--port", "70000"], ["--port", "[1, 65535]"]),
    (["serve", "--threads", "0"], ["--threads", ">= 1"]),
    (["serve", "--max-seqs", "0"], ["max_seqs", ">= 1"]),
    (["serve", "--max-waiting", "-1"], ["max_waiting", ">= 0"]),
    (["serve", "--defer-budget", "-1"], ["defer_budget", ">= 0"]),
    (["serve", "--api-key", ""], ["api_key", "non-empty"]),
    (["serve", "--kv-memory", "0"], ["kv_memory_bytes", ">= 1"]),
])
def test_bad_serve_arguments_exit_2(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_serve_config_checks():
    with pytest.raises(ValueError, match="max_body_bytes: expected an int >= 1"):
        ServeConfig(model_name="m", max_body_bytes=0)
    assert ServeConfig(model_name="m").max_waiting == 64
