"""`dms serve --tensor-parallel 3` under torchrun: rank 0 serves HTTP and drives the engine, the
other ranks follow it; greedy answers equal single-process generate(), and the job ends cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import pytest

import dms_runtime as dr
from test_tensor_parallel import ENV, _free_port

MODEL = "smollm2-135m-instruct-dms-cr8"  # 3 KV heads: one per rank
PROMPTS = ["The capital of France is", "1, 2, 3, 4,"]
MAX_TOKENS = 6


@pytest.mark.slow
def test_serve_tp3_answers_like_one_process(tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_port", str(_free_port()),
           "-m", "dms_runtime.cli", "serve", "--tensor-parallel", "3", "--model", MODEL, "--port", str(port),
           "--threads", "1", "--max-seqs", "4", "--kv-memory", str(16 << 20), "--max-model-len", "512"]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 420
            while True:
                assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, "server not ready:\n" + log.read_text(errors="replace")[-3000:]
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            body = {"model": MODEL, "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=240)
            assert r.status_code == 200, r.text
            got = [c["token_ids"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
            # a bad request is refused on rank 0 and the job keeps serving
            bad = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": -1}, timeout=60)
            assert bad.status_code == 400 and "max_tokens" in bad.json()["error"]["message"]
            again = httpx.post(f"{url}/v1/completions", json={**body, "prompt": PROMPTS[0]}, timeout=240)
            assert again.json()["choices"][0]["token_ids"] == got[0]
        finally:
            proc.send_signal(signal.SIGINT)  # torchrun passes it on; rank 0 releases the followers
            try:
                rc = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError("the TP job did not end after SIGINT:\n" + log.read_text(errors="replace")[-3000:])
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = dr.generate(dr.load(MODEL), PROMPTS, chat=False, max_new_tokens=MAX_TOKENS, ignore_eos=True).token_ids
    finally:
        torch.set_num_threads(threads)
    assert got == want
    # torchrun itself reports the SIGINT it was sent; no rank of ours may have failed
    text = log.read_text(errors="replace")
    assert not [line for line in text.splitlines() if line.startswith("[rank") and "Traceback" in line], text[-3000:]
    assert "could not be told to stop" not in text, text[-3000:]
    assert rc is not None
