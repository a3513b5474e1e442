"""What the serve tests share: a real ``dms serve`` process on a free loopback port, its settings,
and offline references from ``dms_runtime.generate()``.

The server runs the embedded SmolLM2-135M-Instruct with a small pool and a small context so the
tests stay quick on a CPU; it requires an API key (given through ``DMS_API_KEY``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

MODEL = "smollm2-135m-instruct"
API_KEY = "test-key-123"
MAX_SEQS = 8
MAX_WAITING = 8
MAX_MODEL_LEN = 2048  # more than the pool holds for one sequence: both limits are reachable
KV_MEMORY = 48 << 20  # room for MAX_SEQS of the short sequences these tests run: no preemption
MAX_BODY = 64 << 10
START_DEADLINE_S = 420  # loading the model on a busy 2-core machine
REQUEST_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        root = Path(__file__).resolve().parents[2]
        env = dict(os.environ, DMS_API_KEY=API_KEY)
        env["PYTHONPATH"] = os.pathsep.join([str(root / "python"), str(root), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-m", "dms_runtime.cli", "serve", "--model", MODEL, "--port", str(self.port),
               "--max-seqs", str(MAX_SEQS), "--max-waiting", str(MAX_WAITING), "--kv-memory", str(KV_MEMORY),
               "--max-model-len", str(MAX_MODEL_LEN), "--max-body-bytes", str(MAX_BODY), "--threads", "1"]
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dms serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"dms serve not ready after {START_DEADLINE_S} s:\n{self.tail()}")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()

    def wait_idle(self, deadline_s: float = 120) -> dict:
        """Until nothing runs, waits or is in flight; returns /health then (or fails at the deadline)."""
        end = time.monotonic() + deadline_s
        while True:
            h = self.health()
            if h["running"] == 0 and h["waiting"] == 0 and h["in_flight"] == 0:
                return h
            if time.monotonic() > end:
                raise AssertionError(f"server still busy after {deadline_s} s: {h}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self._out.close()


PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):",
           "The three primary colors are"]
CHAT = "What is the capital of France?"
MAX_TOKENS = 8


def offline(lm, prompts, *, chat: bool, **kw) -> list[list[int]]:
    """Token ids that dms_runtime.generate() makes for the same prompts and settings (on one CPU
    thread, as the server: two processes with several threads each crawl on a busy machine)."""
    import torch

    import dms_runtime as dr

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return dr.generate(lm, prompts, chat=chat, **kw).token_ids
    finally:
        torch.set_num_threads(threads)


def dr_encode(lm, prompt: str, chat: bool) -> list[int]:
    from dms_runtime.api import encode_prompts

    return encode_prompts(lm, [prompt], chat)[0]
