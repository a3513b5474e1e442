"""Torch custom ops of the DMS kernels (``torch.ops.dms.*``).

Each op has a fake (meta) implementation, so ``torch.compile`` and CUDA graphs can trace and
capture it. ``paged_attention`` and ``paged_store`` have three kernel sets behind one op:

* the CUDA dispatch key runs the hand-written sm_90a kernels (``dms_kernels._cuda``) where they
  are built, the GPU is a Hopper and they cover the call, else the Triton kernels;
* the CPU dispatch key runs the fused C++ kernels (``dms_kernels._cpu``, :mod:`dms_kernels.cpu`)
  where they are built, else the Triton kernels under ``TRITON_INTERPRET=1`` (tests);
* every other device runs the Triton kernels.

The last argument ``impl`` chooses: ``"auto"`` (by device and availability, as above),
``"triton"`` (forced, e.g. to compare kernel sets on one device, or to test Triton on CPU under
the interpreter), ``"cuda"`` or ``"cpu"`` (forced: an error where those kernels cannot run).
Calls the CUDA kernels do not cover (prefill chunks, fp32, other head dims; see
:mod:`dms_kernels.cuda`) run on Triton under ``"cuda"`` too.
"""

from __future__ import annotations

import torch

from .triton.common import interpreting

IMPLS = ("auto", "triton", "cuda", "cpu")


def _runnable(t: torch.Tensor, name: str = "q") -> None:
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"{name}: the dms Triton ops run on CUDA tensors (or on CPU with TRITON_INTERPRET=1), "
                         f"got {t.device}")


def kernels_for(impl: str, device: torch.device) -> str:
    """The kernel set a call with ``impl`` runs on ``device``: ``"cuda"``, ``"cpu"`` or ``"triton"``."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    if impl == "triton":
        return "triton"
    device = torch.device(device)
    if impl == "cpu" or (impl == "auto" and device.type == "cpu"):
        from . import cpu

        why = cpu.unavailable_reason(device)
        if impl == "cpu" and why is not None:
            raise ValueError(f"impl: 'cpu' cannot run here: {why}")
        return "triton" if why else "cpu"
    from . import cuda

    why = cuda.unavailable_reason(device)
    if impl == "cuda" and why is not None:
        raise ValueError(f"impl: 'cuda' cannot run here: {why}")
    return "triton" if why else "cuda"


def attention_kernels(impl: str, device: torch.device, t: int, dtype: torch.dtype, head_dim: int, group: int) -> str:
    """The kernel set a ``paged_attention`` call runs: ``"cuda"`` (the hand-written decode),
    ``"cpu"`` or ``"triton"``. The op's CUDA- and CPU-key kernels route by it, and the runtime
    reports it per op."""
    kernels = kernels_for(impl, device)
    if kernels != "cuda":  # "cpu", "triton" (or an error for a forced set that cannot run here)
        return kernels
    from . import cuda

    return "cuda" if t == 1 and group >= 1 and cuda.decode_supported(dtype, head_dim, group) else "triton"


def store_kernels(impl: str, device: torch.device, dtype: torch.dtype, pool_dtype: torch.dtype, head_dim: int) -> str:
    """The kernel set a ``paged_store`` call runs (see :func:`attention_kernels`)."""
    kernels = kernels_for(impl, device)
    if kernels == "cpu" and impl == "auto" and pool_dtype != dtype:  # the C++ store copies rows, no conversion
        return "triton"
    if kernels != "cuda":
        return kernels
    from . import cuda

    return "cuda" if cuda.store_supported(dtype, head_dim) and pool_dtype == dtype else "triton"


@torch.library.custom_op("dms::paged_attention", mutates_args=())
def paged_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    new_evict: torch.Tensor,
    n_new: torch.Tensor,
    starts: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    kept_len: torch.Tensor,
    ring_evict: torch.Tensor,
    window: int,
    ring_pages: int,
    scale: float | None = None,
    max_tokens: int = -1,
    impl: str = "auto",
) -> torch.Tensor:
    """DMS attention of new tokens over a paged cache (see docs/ARCHITECTURE.md): the split-K
    decode kernel for one token per sequence, the chunk kernel otherwise. Returns q's shape.
    ``max_tokens``: a host bound on the tokens any list holds (ring + kept), from which decode
    plans its splits; -1 reads it from the device (one host sync). This body is the Triton kernel
    set (devices with no kernel of their own; CUDA and CPU have one; on CPU, Triton runs under the
    interpreter)."""
    _runnable(q)
    kernels_for(impl, q.device)  # validates impl; "cuda" is refused off a CUDA device
    return _triton_attention(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len, ring_evict,
                             window, ring_pages, scale, max_tokens)


def _triton_attention(*args):
    from .triton.attention_op import triton_paged_attention

    *args, max_tokens = args
    return triton_paged_attention(*args, max_tokens=None if max_tokens < 0 else max_tokens)


@paged_attention.register_kernel("cuda")
def paged_attention_cuda(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len, ring_evict, window, ring_pages,
      scale=None, max_tokens=-1, impl="auto"):
    args = (q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len, ring_evict, window,
            ring_pages, scale, max_tokens)
    b, hq, t, d = q.shape
    h = k_new.shape[1]
    if h and hq % h == 0 and attention_kernels(impl, q.device, t, q.dtype, d, hq // h) == "cuda":
        from . import cuda

        planned = {}
        if max_tokens >= 0:  # the same plan for every layer of a step (cached by its arguments): no host sync
            planned["plan"] = cuda.cached_decode_plan(b * h, hq // h, d, q.dtype, max_tokens, q.device)
        return cuda.paged_decode_attention(q[:, :, 0], k_new[:, :, 0], v_new[:, :, 0], k_pool, v_pool, table,
                                           starts, kept_len, window, ring_pages, scale=scale, **planned)[:, :, None]
    return _triton_attention(*args)


@paged_attention.register_kernel("cpu")
def paged_attention_cpu(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len, ring_evict, window,
                        ring_pages, scale=None, max_tokens=-1, impl="auto"):
    args = (q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len, ring_evict, window,
            ring_pages, scale)
    if kernels_for(impl, q.device) == "cpu":  # reads the lengths where they lie (host memory): no bound needed
        from . import cpu

        return cpu.paged_attention(*args)
    _runnable(q)
    return _triton_attention(*args, max_tokens)


@paged_attention.register_fake
def _(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len, ring_evict, window, ring_pages,
      scale=None, max_tokens=-1, impl="auto"):
    return torch.empty_like(q)


def paged_attention_op(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len, ring_evict,
                       window, ring_pages, scale=None, max_tokens=-1, impl="auto"):
    """The paged runtime's attention signature, through ``torch.ops.dms.paged_attention``."""
    return torch.ops.dms.paged_attention(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len,
                                         ring_evict, window, ring_pages, scale, max_tokens, impl)


@torch.library.custom_op("dms::paged_store", mutates_args=("k_pool", "v_pool", "ring_evict"))
def paged_store(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    new_evict: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    page_table: torch.Tensor,
    ring_evict: torch.Tensor,
    lists: torch.Tensor,
    kept0: torch.Tensor,
    starts: torch.Tensor,
    n_new: torch.Tensor,
    window: int,
    ring_pages: int,
    impl: str = "auto",
) -> None:
    """Data movement of a store step (pages allocated beforehand): tokens leaving the window to the
    kept store if kept, the new tokens inside the window into their ring slots. This body is the
    Triton kernel (devices with no kernel of their own; CUDA and CPU have one)."""
    _runnable(k_new, "k_new")
    kernels_for(impl, k_new.device)
    _triton_store(k_new, v_new, new_evict, k_pool, v_pool, page_table, ring_evict, lists, kept0, starts, n_new, window,
                  ring_pages)


def _triton_store(*args):
    from .triton.store_op import paged_store as launch

    launch(*args)


@paged_store.register_kernel("cuda")
def paged_store_cuda(k_new, v_new, new_evict, k_pool, v_pool, page_table, ring_evict, lists, kept0, starts, n_new, window, ring_pages,
      impl="auto"):
    args = (k_new, v_new, new_evict, k_pool, v_pool, page_table, ring_evict, lists, kept0, starts, n_new, window,
            ring_pages)
    if store_kernels(impl, k_new.device, k_new.dtype, k_pool.dtype, k_new.shape[-1]) == "cuda":
        from . import cuda

        return cuda.paged_store(*args)
    _triton_store(*args)


@paged_store.register_kernel("cpu")
def paged_store_cpu(k_new, v_new, new_evict, k_pool, v_pool, page_table, ring_evict, lists, kept0, starts, n_new, window,
                    ring_pages, impl="auto"):
    args = (k_new, v_new, new_evict, k_pool, v_pool, page_table, ring_evict, lists, kept0, starts, n_new, window,
            ring_pages)
    if kernels_for(impl, k_new.device) == "cpu":
        from . import cpu

        # the C++ store copies rows: a pool of another dtype (a conversion) is Triton's under "auto"
        if impl == "cpu" or k_pool.dtype == k_new.dtype:
            return cpu.paged_store(*args)
    _runnable(k_new, "k_new")
    _triton_store(*args)


@paged_store.register_fake
def _(k_new, v_new, new_evict, k_pool, v_pool, page_table, ring_evict, lists, kept0, starts, n_new, window, ring_pages,
      impl="auto"):
    return None


def paged_store_op(*args, impl="auto"):
    """The store mover's signature (:func:`paged_store`), through ``torch.ops.dms.paged_store``."""
    return torch.ops.dms.paged_store(*args, impl)


@torch.library.custom_op("dms::fused_project", mutates_args=("ring_evict",))
def fused_project(
    q_raw: torch.Tensor,
    k_raw: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    adapter_logits: torch.Tensor | None,
    ring_evict: torch.Tensor,
    lists: torch.Tensor,
    starts: torch.Tensor,
    n_new: torch.Tensor,
    num_kv_heads: int,
    variant: str,
    eps: float,
    scale: float,
    offset: float,
    sink_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k norm, eviction logit, borrowed-channel zeroing, RoPE, the attention sinks (the first
    ``sink_tokens`` keys kept) and the previous key's decision for the new tokens of one layer
    (``variant``: "borrowed", "adapter" or "none")."""
    _runnable(q_raw)
    from .triton.project_op import fused_project as launch

    q, k, logits = launch(q_raw, k_raw, cos, sin, num_kv_heads=num_kv_heads, q_norm_weight=q_norm_weight,
                          k_norm_weight=k_norm_weight, eps=eps, variant=None if variant == "none" else variant,
                          adapter_logits=adapter_logits, scale=scale, offset=offset, ring_evict=ring_evict,
                          lists=lists, starts=starts, n_new=n_new, sink_tokens=sink_tokens)
    if logits is None:
        logits = torch.zeros(k.shape[:3], dtype=torch.float32, device=k.device)
    return q, k, logits


@fused_project.register_fake
def _(q_raw, k_raw, cos, sin, q_norm_weight, k_norm_weight, adapter_logits, ring_evict, lists, starts, n_new,
      num_kv_heads, variant, eps, scale, offset, sink_tokens=0):
    b, t, _ = q_raw.shape
    d = k_raw.shape[2] // num_kv_heads
    hq = q_raw.shape[2] // d
    return (q_raw.new_empty(b, hq, t, d), k_raw.new_empty(b, num_kv_heads, t, d),
            q_raw.new_empty(b, num_kv_heads, t, dtype=torch.float32))
