"""One set of torch ops, two kernel sets: ``torch.ops.dms.paged_attention`` / ``paged_store`` have a
CUDA-key kernel that runs the hand-written sm_90a kernels where they can run and cover the call
(else Triton), ``impl`` forces either, and the runtime's backends are these ops with ``impl`` set.

Runs on CPU: the CUDA-key kernels are called directly with CPU tensors and the hand-written calls
recorded, so the routing is checked here; the kernels' numerics are in test_cuda_kernels.py (GPU)."""

import os

import pytest
import torch

import dms_kernels.ops as ops
from dms_kernels import cuda as dcuda

interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                            reason="the Triton kernels run on CPU under TRITON_INTERPRET=1 (set by the test run)")


def attention_args(t=1, dtype=torch.bfloat16, d=64, b=2, hq=4, h=2, w=4, ps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return (mk(b, hq, t, d), mk(b, h, t, d), mk(b, h, t, d), torch.rand(b, h, t, generator=g) < 0.5,
            torch.full((b,), t), torch.tensor([0, 5]), mk(16, ps, d), mk(16, ps, d),
            torch.randperm(16, generator=g)[: b * h * 3].view(b, h, 3), torch.tensor([[0, 0], [1, 0]]),
            torch.rand(b, h, w, generator=g) < 0.5, w, 1)


def store_args(t=3, dtype=torch.float32, d=16, b=2, h=2, w=4, ps=4):
    nl = b * h
    return (torch.randn(b, h, t, d, dtype=dtype), torch.randn(b, h, t, d, dtype=dtype), torch.rand(b, h, t) < 0.5,
            torch.zeros(nl * 4, ps, d, dtype=dtype), torch.zeros(nl * 4, ps, d, dtype=dtype),
            torch.arange(nl * 4).view(nl, 4), torch.zeros(nl, w, dtype=torch.bool), torch.arange(nl).view(b, h),
            torch.zeros(b, h, dtype=torch.int64), torch.tensor([0, 2]), torch.tensor([t, 1]), w, 1)


def test_the_ops_carry_a_cuda_kernel_and_an_impl_argument():
    for op in ("dms::paged_attention", "dms::paged_store"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    for schema in (torch.ops.dms.paged_attention.default._schema, torch.ops.dms.paged_store.default._schema):
        last = schema.arguments[-1]
        assert (last.name, str(last.type), last.default_value) == ("impl", "str", "auto")
    with pytest.raises(AttributeError):  # no second set of ops for the CUDA kernels
        torch.ops.dms.cuda_paged_attention


def test_kernels_for_validates_and_prefers_cuda(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(ValueError, match="impl: expected one of 'auto', 'triton', 'cuda', 'cpu', got 'flash'"):
        ops.kernels_for("flash", cpu)
    with pytest.raises(ValueError, match="impl: 'cuda' cannot run here: the CUDA kernels run on CUDA tensors"):
        ops.kernels_for("cuda", cpu)
    from dms_kernels import cpu as dcpu  # on CPU "auto" runs the CPU kernels where built (tests/kernels/test_cpu_kernels.py)

    assert ops.kernels_for("auto", cpu) == ("cpu" if dcpu.built() else "triton")
    assert ops.kernels_for("triton", cpu) == "triton"
    monkeypatch.setattr(dcuda, "unavailable_reason", lambda dev: None)
    assert ops.kernels_for("auto", gpu) == ops.kernels_for("cuda", gpu) == "cuda"
    assert ops.kernels_for("triton", gpu) == "triton"
    monkeypatch.setattr(dcuda, "unavailable_reason", lambda dev: "this GPU is sm_80")
    assert ops.kernels_for("auto", gpu) == "triton"
    with pytest.raises(ValueError, match="impl: 'cuda' cannot run here: this GPU is sm_80"):
        ops.kernels_for("cuda", gpu)


def test_unavailable_reason_names_what_is_missing():
    assert "CUDA tensors" in dcuda.unavailable_reason(torch.device("cpu"))
    why = dcuda.unavailable_reason(torch.device("cuda"))
    if not torch.cuda.is_available():
        assert why is not None and ("not built" in why or "no CUDA device" in why)


class Recorder:
    def __init__(self):
        self.calls = []

    def decode(self, q, k_new, v_new, *rest, scale=None):
        self.calls.append(("decode", tuple(q.shape)))
        return torch.full_like(q, 7.0)

    def store(self, *args):
        self.calls.append(("store", tuple(args[0].shape)))


@interp
@pytest.mark.parametrize("impl", ["auto", "cuda"])
def test_cuda_key_routes_covered_calls_to_the_hand_written_kernels(impl, monkeypatch):
    """Decode with fp16/bf16, D 64/128 and a group <= 16 goes to the CUDA kernel; prefill chunks,
    fp32 and other head dims run on Triton inside the same op (same result as impl="triton")."""
    rec = Recorder()
    monkeypatch.setattr(ops, "kernels_for", lambda impl_, dev: "cuda" if impl_ in ("auto", "cuda") else "triton")
    monkeypatch.setattr(dcuda, "paged_decode_attention", rec.decode)
    monkeypatch.setattr(dcuda, "paged_store", rec.store)
    out = ops.paged_attention_cuda(*attention_args(t=1), None, impl=impl)
    assert rec.calls == [("decode", (2, 4, 64))] and out.shape == (2, 4, 1, 64) and bool((out == 7).all())
    for args in (attention_args(t=3), attention_args(t=1, dtype=torch.float32), attention_args(t=1, d=16)):
        rec.calls.clear()
        got = ops.paged_attention_cuda(*args, None, impl=impl)
        assert rec.calls == []
        torch.testing.assert_close(got, ops.paged_attention_cuda(*args, None, impl="triton"), rtol=0, atol=0)
        assert torch.isfinite(got.float()).all()
    rec.calls.clear()
    ops.paged_store_cuda(*store_args(dtype=torch.float16, d=64), impl)
    assert rec.calls == [("store", (2, 2, 3, 64))]
    rec.calls.clear()
    a = store_args(d=2)  # 8-byte rows: not a multiple of 16 bytes, Triton moves them
    ops.paged_store_cuda(*a, impl)
    assert rec.calls == [] and a[3].abs().sum() > 0


@interp
def test_the_op_on_cpu_runs_triton_and_refuses_cuda():
    args = attention_args(t=2, dtype=torch.float32, d=16)
    auto = torch.ops.dms.paged_attention(*args, None)  # the CPU kernels where built, else Triton
    torch.testing.assert_close(torch.ops.dms.paged_attention(*args, None, impl="triton"), auto, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="impl: 'cuda' cannot run here"):
        torch.ops.dms.paged_attention(*args, None, impl="cuda")
    with pytest.raises(ValueError, match="impl: 'cuda' cannot run here"):
        ops.paged_store_op(*store_args(), impl="cuda")
    with pytest.raises(ValueError, match="impl: expected one of"):
        ops.paged_store_op(*store_args(), impl="CUDA")


def test_backends_are_the_same_op_with_impl_forced(monkeypatch):
    from types import SimpleNamespace

    from dms_runtime.paged import backends

    seen = []
    monkeypatch.setattr(ops, "paged_attention_op", lambda *a, **k: seen.append(("attention", k["impl"])))
    monkeypatch.setattr(ops, "paged_store_op", lambda *a, **k: seen.append(("store", k["impl"])))
    cache = SimpleNamespace(k_pool=0, v_pool=0, page_table=0, ring_evict=0, w=4, R=1)
    plan = SimpleNamespace(n_new=0, starts=0, tables=[0], kept0=[0], max_tokens=3)
    for name in ("triton", "cuda"):
        kernels = backends.OpKernels(name)
        kernels.attend(cache, plan, 0, 1, 2, 3, 4, 5)
        kernels.store(cache, plan, 0, 1, 2, 3, 4, 5)
    assert seen == [("attention", "triton"), ("store", "triton"), ("attention", "cuda"), ("store", "cuda")]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'cuda' cannot run on cpu .*CUDA tensors"):
            backends.resolve("cuda", torch.device("cpu"))
