"""Time greedy decoding under the heuristic policies (``PolicyCache``) on one attention layer with
random inputs: a prefill of ``--length`` tokens, then ``--steps`` decoded tokens, per policy; prints
the prefill's time, the time per decoded token and the K/V the cache holds. Runs the ``dms_runtime``
on ``sys.path``, so the same script times another commit's code (``PYTHONPATH=<worktree>/python``).

    .venv/bin/python bench/policy_decode.py --length 8192 --budget 1000 --steps 64
"""

from __future__ import annotations

import argparse
import time

import torch

from dms_runtime.retrofit.policies import PolicyCache


@torch.inference_mode()
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--budget", type=int, default=1000, help="KV tokens per KV head")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--policies", nargs="+", default=["streaming", "tova", "h2o", "quest"])
    p.add_argument("--heads", type=int, nargs=3, default=[3, 3, 64], metavar=("HKV", "GROUP", "DIM"),
                   help="SmolLM2-135M's by default")
    a = p.parse_args(argv)
    hkv, g, d = a.heads
    gen = torch.Generator().manual_seed(0)
    n = a.length + a.steps
    q, k, v = (torch.randn(1, h, n, d, generator=gen) for h in (hkv * g, hkv, hkv))
    for policy in a.policies:
        cache = PolicyCache(policy, a.budget)
        t0 = time.perf_counter()
        cache.attend(0, q[:, :, : a.length], k[:, :, : a.length], v[:, :, : a.length], None)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(a.length, n):
            cache.attend(0, q[:, :, i: i + 1], k[:, :, i: i + 1], v[:, :, i: i + 1], None)
        ms = 1e3 * (time.perf_counter() - t0) / a.steps
        mib = (cache.k[0].numel() + cache.v[0].numel()) * 4 / 2**20
        print(f"{policy:10s} prefill {prefill:6.2f} s   {ms:7.2f} ms per decoded token (one layer)   K/V held {mib:6.2f} MiB "
              f"({cache.k[0].shape[1]} tokens per KV head)")


if __name__ == "__main__":
    main()
