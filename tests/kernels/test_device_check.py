"""bench/device_check.sh runs from a clean checkout; without a GPU in its small CPU mode."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the full device check is run by hand")
def test_device_check_small_mode(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "RESULTS_DIR": str(tmp_path)}
    env.pop("OUT", None)
    run = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh")], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = next(tmp_path.glob("*-cpu-small.md")).read_text()
    assert "| True |" in report and "| False |" not in report
    assert "## Decode" in report and "## Prefill" in report
