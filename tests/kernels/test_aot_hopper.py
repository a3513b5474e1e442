"""Every Triton kernel builds for sm_90a ahead of time (no GPU needed), with no spills.

The build runs in a child process without TRITON_INTERPRET (under the interpreter the kernels
are Python functions, not compilable)."""

import json
import os
import subprocess
import sys


def test_all_kernels_compile_for_sm90a_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "dms_kernels.triton.aot"], capture_output=True, text=True, env=env,
                         timeout=900)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert rows, run.stderr[-3000:]
    names = {r["kernel"].split("[")[0] for r in rows}
    assert {"paged_decode", "paged_prefill", "paged_store", "fused_project"} <= names
    for r in rows:
        assert r["sm_90a"], r
        assert r["stack"] == 0 and r["local"] == 0, f"spills or local memory: {r}"
        assert r["reg"] <= 255, r
    assert run.returncode == 0, run.stderr[-3000:]
