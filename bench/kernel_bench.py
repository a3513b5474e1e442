"""Correctness of the Triton and CUDA kernels against dms_kernels.reference, then their timings
against FlashAttention (torch SDPA's flash backend) on the dense cache of the same logical length.

Needs only torch, triton and this repository (``PYTHONPATH=.``): it runs on a bare GPU machine.
The CUDA rows need ``dms_kernels._cuda`` (built by ``pip install -e .`` where nvcc exists) and a
Hopper GPU; elsewhere they are reported as skipped with the reason.

    python bench/kernel_bench.py --mode gpu  --out bench/results/<date>-h200.md   # on a Hopper GPU
    TRITON_INTERPRET=1 python bench/kernel_bench.py --mode cpu                    # tiny sizes, interpreter

Decode: ``B`` sequences, each KV head holding ``ctx / CR`` tokens of a logical context ``ctx``
(the ring of ``w`` tokens plus the kept store), one new token per sequence; the dense anchor is
SDPA flash over ``[B, Hq, ctx, D]`` with GQA. Achieved bandwidth = K/V bytes the kernel must
read / time, next to a device-to-device copy measured in the same run.
Prefill: one sequence of ``T`` tokens in one chunk (empty cache), against SDPA flash causal.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dms_kernels import reference as ref  # noqa: E402
from dms_kernels.triton.attention_op import triton_paged_attention  # noqa: E402


JSONL: Path | None = None  # --jsonl: every row is appended as soon as it exists (survives a kill)
CUDA_SKIP: str | None = None  # --skip-cuda REASON: the device check's GPU tests of the CUDA kernels failed


def emit(row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if JSONL is not None:
        with JSONL.open("a") as f:
            f.write(line + "\n")


def cuda_skip_reason() -> str | None:
    """Why the CUDA kernels cannot run here (None: they can)."""
    from dms_kernels import cuda

    return CUDA_SKIP or cuda.unavailable_reason(torch.device("cuda"))


def op_attention(impl, **x):
    """torch.ops.dms.paged_attention with its kernel set forced (``impl``: "triton" or "cuda")."""
    from dms_kernels.ops import paged_attention_op

    return paged_attention_op(**x, impl=impl)


# ----------------------------------------------------------------------------- inputs


def paged_inputs(b, hq, h, t, d, w, ps, n_ring, kept, starts, dtype, device, evict_p=0.5, seed=0):
    """Random paged cache: lists of ``n_ring[b]`` ring + ``kept[b, h]`` kept tokens on shuffled pages."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    r_pages = math.ceil(w / ps)
    kcols = max(1, math.ceil(int(kept.max()) / ps))
    tw = r_pages + kcols
    n_pages = b * h * tw
    perm = torch.randperm(n_pages, generator=g)
    table = torch.full((b, h, tw), -1, dtype=torch.int64)
    nxt = 0
    for bi in range(b):
        rp = math.ceil(int(n_ring[bi]) / ps)
        for hi in range(h):
            kp = math.ceil(int(kept[bi, hi]) / ps)
            table[bi, hi, :rp] = perm[nxt : nxt + rp]
            nxt += rp
            table[bi, hi, r_pages : r_pages + kp] = perm[nxt : nxt + kp]
            nxt += kp
    gd = torch.Generator(device=device).manual_seed(seed)  # made where they live: long-context pools are GBs
    mk = lambda *s: torch.randn(*s, generator=gd, device=device, dtype=dtype)  # noqa: E731
    return dict(
        q=mk(b, hq, t, d), k_new=mk(b, h, t, d), v_new=mk(b, h, t, d),
        new_evict=(torch.rand(b, h, t, generator=g) < evict_p).to(device),
        n_new=torch.full((b,), t, dtype=torch.int64, device=device), starts=starts.to(device),
        k_pool=mk(max(n_pages, 1), ps, d), v_pool=mk(max(n_pages, 1), ps, d), table=table.to(device),
        kept_len=kept.to(device), ring_evict=(torch.rand(b, h, w, generator=g) < evict_p).to(device),
        window=w, ring_pages=r_pages,
    )


def reference_output(x):
    """Each list as a dense history where slot j holds position j, run through
    reference.dms_attention_cached: kept tokens sit at old positions with *keep*, ring tokens at
    their real positions with their decisions, other old slots are evicted tokens (invisible)."""
    q, k_new, v_new = x["q"].double().cpu(), x["k_new"].double().cpu(), x["v_new"].double().cpu()
    b, hq, t, d = q.shape
    h = k_new.shape[1]
    g = hq // h
    w, r_pages = x["window"], x["ring_pages"]
    ps = x["k_pool"].shape[1]
    kp, vp = x["k_pool"].double().cpu(), x["v_pool"].double().cpu()
    table, kept, starts = x["table"].cpu(), x["kept_len"].cpu(), x["starts"].cpu()
    ring_ev, new_ev = x["ring_evict"].cpu(), x["new_evict"].cpu()
    out = torch.zeros(b, hq, t, d, dtype=torch.float64)
    for bi in range(b):
        s = int(starts[bi])
        for hi in range(h):
            kk = torch.zeros(1, 1, s + t, d, dtype=torch.float64)
            vv = torch.zeros_like(kk)
            dec = torch.ones(1, 1, s + t, dtype=torch.bool)  # old slots not held: evicted
            for j in range(int(kept[bi, hi])):  # kept tokens: positions 0.. (older than the window)
                page, off = table[bi, hi, r_pages + j // ps], j % ps
                kk[0, 0, j], vv[0, 0, j], dec[0, 0, j] = kp[page, off], vp[page, off], False
            for r in range(w):
                p = s - 1 - ((s - 1 - r) % w)
                if p >= 0:
                    page, off = table[bi, hi, r // ps], r % ps
                    kk[0, 0, p], vv[0, 0, p], dec[0, 0, p] = kp[page, off], vp[page, off], ring_ev[bi, hi, r]
            kk[0, 0, s:], vv[0, 0, s:] = k_new[bi, hi], v_new[bi, hi]
            dec[0, 0, s:] = new_ev[bi, hi]
            dec[0, 0, s + t - 1] = False  # the last new key's decision is not known yet
            qq = q[bi : bi + 1, hi * g : (hi + 1) * g]
            out[bi, hi * g : (hi + 1) * g] = ref.dms_attention_cached(
                qq, kk, vv, dec, w, (s + torch.arange(t))[None], torch.tensor([s + t]))[0]
    return out


# ----------------------------------------------------------------------------- timing


def bench(fn, warmup=3, iters=10, device="cuda"):
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        ts = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e) / 1e3)
    else:
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def copy_bandwidth(device, nbytes=2 << 30):
    if device != "cuda":
        return float("nan")
    a = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), warmup=2, iters=5)
    return 2 * nbytes / t  # read + write


def sdpa_flash(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if q.device.type != "cuda":  # CPU small mode: whatever SDPA picks
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


# ----------------------------------------------------------------------------- main


def check(device, dtype, sizes):
    rows = []
    for (b, hq, h, t, d, w, ps) in sizes:
        starts = torch.randint(0, 3 * w, (b,))
        starts[0] = 0
        n_ring = torch.clamp(starts, max=w)
        kept = torch.randint(0, 3 * ps + 2, (b, h))
        kept[0] = 0  # a fresh sequence holds nothing
        kept = torch.minimum(kept, torch.clamp(starts - w, min=0)[:, None])
        x = paged_inputs(b, hq, h, t, d, w, ps, n_ring, kept, starts, dtype, device)
        out = triton_paged_attention(**x).double().cpu()
        exp = reference_output(x)
        err = (out - exp).abs().max().item()
        tol = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
        ok = bool(torch.isfinite(out).all()) and err <= tol
        rows.append({"impl": "triton", "check": f"B={b} Hq={hq} H={h} T={t} D={d} w={w} ps={ps}", "dtype": str(dtype),
                     "max_err": err, "ok": ok})
        emit(rows[-1])
    return rows


# decode cases of the CUDA kernels: ragged lists with 0 and 1 tokens, ring and kept page boundaries,
# several tiles and splits; (starts, kept per KV head) with kept <= start - w
CUDA_W, CUDA_PS = 37, 16
CUDA_STARTS = [0, 1, 36, 37, 38, 53, 111, 3000]
CUDA_KEPT = [[0, 0], [0, 0], [0, 0], [0, 0], [1, 0], [15, 16], [17, 40], [2900, 1500]]


def check_cuda(device):
    """CUDA decode against the reference (GQA 1/4/8, D 64/128, fp16/bf16) and the CUDA store
    against the Triton store (exact); skipped rows say why when the kernels cannot run here."""
    reason = cuda_skip_reason() if device == "cuda" else "no CUDA device"
    if reason:
        row = {"impl": "cuda", "check": "decode and store kernels", "dtype": "-", "max_err": float("nan"),
               "ok": f"skipped: {reason}"}
        emit(row)
        return [row]
    rows = []
    b, h = len(CUDA_STARTS), 2
    starts = torch.tensor(CUDA_STARTS)
    kept = torch.tensor(CUDA_KEPT)
    for dtype in (torch.bfloat16, torch.float16):
        for d in (64, 128):
            for g in (1, 4, 8):
                x = paged_inputs(b, h * g, h, 1, d, CUDA_W, CUDA_PS, torch.clamp(starts, max=CUDA_W), kept, starts,
                                 dtype, device, seed=d + g)
                out = op_attention("cuda", **x).double().cpu()
                err = (out - reference_output(x)).abs().max().item()
                tol = {torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
                rows.append({"impl": "cuda", "check": f"decode B={b} Hq={h * g} H={h} D={d} w={CUDA_W} ps={CUDA_PS} "
                             f"lens 0..{CUDA_W + max(max(k) for k in CUDA_KEPT)}", "dtype": str(dtype),
                             "max_err": err, "ok": bool(torch.isfinite(out).all()) and err <= tol})
                emit(rows[-1])
    rows.append(check_cuda_store(device))
    emit(rows[-1])
    return rows


def check_cuda_store(device, b=4, h=2, d=128, ps=16, w=37, t=70, dtype=torch.bfloat16):
    from dms_kernels import cuda
    from dms_kernels.triton.store_op import paged_store as triton_store

    R, K = math.ceil(w / ps), 16
    nl = 3 * b * h
    page_table = torch.randperm(nl * (R + K), device=device).view(nl, R + K)
    k_pool = torch.randn(nl * (R + K), ps, d, device=device, dtype=dtype)
    v_pool = torch.randn_like(k_pool)
    ring_evict = torch.rand(nl, w, device=device) < 0.5
    lists = torch.randperm(nl, device=device)[: b * h].view(b, h)
    starts = torch.tensor([0, 1, w - 2, 90], device=device)
    n_new = torch.tensor([t, 1, t, t - 3], device=device)
    kept0 = torch.minimum(torch.randint(0, 40, (b, h), device=device), torch.clamp(starts - w, min=0)[:, None])
    k_new, v_new = torch.randn(2, b, h, t, d, device=device, dtype=dtype)
    new_evict = torch.rand(b, h, t, device=device) < 0.5
    ours = (k_pool.clone(), v_pool.clone(), ring_evict.clone())
    theirs = (k_pool.clone(), v_pool.clone(), ring_evict.clone())
    cuda.paged_store(k_new, v_new, new_evict, *ours[:2], page_table, ours[2], lists, kept0, starts, n_new, w, R)
    triton_store(k_new, v_new, new_evict, *theirs[:2], page_table, theirs[2], lists, kept0, starts, n_new, w, R)
    same = all(torch.equal(a, e) for a, e in zip(ours, theirs))
    return {"impl": "cuda", "check": f"store B={b} H={h} T={t} D={d} w={w} ps={ps} (= triton store)",
            "dtype": str(dtype), "max_err": 0.0 if same else float("inf"), "ok": same}


def timings(device, dtype, contexts, batches, crs, d=128, hq=32, h=8, w=256, ps=16, prefill_tokens=(16384,)):
    rows = []
    bw = copy_bandwidth(device)
    elem = torch.tensor([], dtype=dtype).element_size()
    cuda_reason = cuda_skip_reason() if device == "cuda" else "no CUDA device"
    for ctx in contexts:
        for b in batches:
            dense_bytes = 2 * b * h * ctx * d * elem
            if dense_bytes > 40 << 30:
                continue
            kd = torch.randn(b, h, ctx, d, device=device, dtype=dtype)
            vd = torch.randn_like(kd)
            qd = torch.randn(b, hq, 1, d, device=device, dtype=dtype)
            t_flash = bench(lambda: sdpa_flash(qd, kd, vd, False), device=device)
            del kd, vd
            for cr in crs:
                held = max(1, ctx // cr)
                starts = torch.full((b,), ctx)
                n_ring = torch.clamp(starts, max=w)
                kept = torch.full((b, h), max(0, held - w), dtype=torch.int64)
                x = paged_inputs(b, hq, h, 1, d, w, ps, n_ring, kept, starts, dtype, device)
                t_ours = bench(lambda: op_attention("triton", **x), device=device)
                t_cuda = bench(lambda: op_attention("cuda", **x), device=device) if cuda_reason is None else None
                read = 2 * b * h * (int(n_ring[0]) + int(kept[0, 0])) * d * elem
                rows.append({"kind": "decode", "ctx": ctx, "batch": b, "cr": cr, "ours_us": t_ours * 1e6,
                             "flash_dense_us": t_flash * 1e6, "speedup_vs_flash": t_flash / t_ours,
                             "achieved_GBps": read / t_ours / 1e9, "copy_GBps": bw / 1e9,
                             "fraction_of_copy": (read / t_ours) / bw if bw == bw else float("nan"),
                             "cuda_us": t_cuda * 1e6 if t_cuda else None,
                             "cuda_GBps": read / t_cuda / 1e9 if t_cuda else None,
                             "cuda_fraction_of_copy": (read / t_cuda) / bw if t_cuda and bw == bw else None,
                             "cuda_skipped": cuda_reason})
                emit(rows[-1])
                del x
    for t in prefill_tokens:
        q = torch.randn(1, hq, t, d, device=device, dtype=dtype)
        k = torch.randn(1, h, t, d, device=device, dtype=dtype)
        v = torch.randn_like(k)
        t_flash = bench(lambda: sdpa_flash(q, k, v, True), device=device)
        x = paged_inputs(1, hq, h, t, d, w, ps, torch.zeros(1, dtype=torch.int64), torch.zeros(1, h, dtype=torch.int64),
                         torch.zeros(1, dtype=torch.int64), dtype, device, evict_p=0.875)
        t_ours = bench(lambda: triton_paged_attention(**x), device=device)
        rows.append({"kind": "prefill", "tokens": t, "ours_us": t_ours * 1e6, "flash_us": t_flash * 1e6,
                     "ratio_vs_flash": t_ours / t_flash})
        emit(rows[-1])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["gpu", "cpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--jsonl", default=None, help="append each row to this file as soon as it is measured")
    ap.add_argument("--skip-cuda", default=None, metavar="REASON",
                    help="report the CUDA rows as skipped for REASON (the device check passes it when the GPU "
                         "tests of the CUDA kernels failed or hung in their own process)")
    args = ap.parse_args()
    global JSONL, CUDA_SKIP
    JSONL = Path(args.jsonl) if args.jsonl else None
    CUDA_SKIP = args.skip_cuda
    if args.mode == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--mode cpu runs the kernels under the interpreter: set TRITON_INTERPRET=1")
    device = "cuda" if args.mode == "gpu" else "cpu"
    small = [(2, 4, 2, 1, 16, 4, 4), (3, 4, 1, 5, 32, 3, 2), (1, 8, 2, 9, 16, 4, 16)]
    full = small + [(4, 32, 8, 1, 128, 256, 16), (2, 32, 8, 64, 128, 64, 16), (3, 28, 4, 1, 128, 16, 16)]
    dtypes = [torch.bfloat16, torch.float16] if device == "cuda" else [torch.float32]
    checks = []
    for dt in dtypes:
        checks += check(device, dt, full if device == "cuda" else small)
    checks += check_cuda(device)
    if device == "cuda":
        times = timings(device, torch.bfloat16, contexts=(4096, 32768, 131072), batches=(1, 8, 64), crs=(1, 4, 8))
    else:
        times = timings(device, torch.float32, contexts=(64,), batches=(2,), crs=(1, 4), d=16, hq=4, h=2, w=8, ps=4,
                        prefill_tokens=(32,))
    info = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if device == "cuda" else
            platform.processor() or platform.machine(), "torch": torch.__version__,
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
    lines = [f"# Kernel check and timings — {info['device']}, {info['date']}", "",
             f"torch {info['torch']}, commit {info['commit']}, mode {args.mode}", "", "## Correctness vs dms_kernels.reference", "",
             "| kernels | case | dtype | max abs err | ok |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['impl']} | {r['check']} | {r['dtype']} | {r['max_err']:.2e} | {r['ok']} |" for r in checks]
    if times:
        title = ("bf16, D=128, Hq=32, H=8, w=256, page 16" if device == "cuda"
                 else "CPU interpreter, tiny sizes: these times only show that the benchmark runs")
        lines += ["", f"## Decode ({title})", "",
                  "Triton and CUDA read the same paged cache; flash reads the dense cache of the whole context.", "",
                  "| ctx | batch | CR | triton µs | cuda µs | flash dense µs | triton vs flash | cuda speed-up over triton | "
                  "triton GB/s | cuda GB/s | copy GB/s | triton of copy | cuda of copy |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in (r for r in times if r["kind"] == "decode"):
            if r["cuda_us"] is None:
                cu, cu_ratio, cu_bw, cu_frac = f"skipped ({r['cuda_skipped']})", "-", "-", "-"
            else:
                cu, cu_ratio = f"{r['cuda_us']:.1f}", f"{r['ours_us'] / r['cuda_us']:.2f}x"
                cu_bw, cu_frac = f"{r['cuda_GBps']:.0f}", f"{r['cuda_fraction_of_copy']:.0%}"
            lines.append(f"| {r['ctx']} | {r['batch']} | {r['cr']} | {r['ours_us']:.1f} | {cu} | {r['flash_dense_us']:.1f} | "
                         f"{r['speedup_vs_flash']:.2f}x | {cu_ratio} | {r['achieved_GBps']:.0f} | {cu_bw} | "
                         f"{r['copy_GBps']:.0f} | {r['fraction_of_copy']:.0%} | {cu_frac} |")
        lines += ["", "## Prefill (one chunk, empty cache)", "", "| tokens | ours µs | flash µs | ours / flash |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {r['tokens']} | {r['ours_us']:.0f} | {r['flash_us']:.0f} | {r['ratio_vs_flash']:.2f} |"
                  for r in times if r["kind"] == "prefill"]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    if not all(r["ok"] is True or str(r["ok"]).startswith("skipped") for r in checks):
        raise SystemExit("correctness check failed")


if __name__ == "__main__":
    main()
