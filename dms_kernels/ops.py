"""Torch custom ops of the DMS kernels (``torch.ops.dms.*``).

Each op has a fake (meta) implementation, so ``torch.compile`` and CUDA graphs can trace and
capture it. On CUDA the Triton kernels run; on CPU the ops run the same kernels under
``TRITON_INTERPRET=1`` (tests) and refuse otherwise.
"""

from __future__ import annotations

import torch

from .triton.common import interpreting


def _runnable(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"q: the dms Triton ops run on CUDA tensors (or on CPU with TRITON_INTERPRET=1), got {t.device}")


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
) -> torch.Tensor:
    """DMS attention of new tokens over a paged cache (see docs/ARCHITECTURE.md): the split-K
    decode kernel for one token per sequence, the chunk kernel otherwise. Returns q's shape."""
    _runnable(q)
    from .triton.attention_op import triton_paged_attention

    return triton_paged_attention(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len,
                                  ring_evict, window, ring_pages, scale)


@paged_attention.register_fake
def _(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len, ring_evict, window, ring_pages,
      scale=None):
    return torch.empty_like(q)


def paged_attention_op(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len, ring_evict,
                       window, ring_pages, scale=None):
    """The paged runtime's attention signature, through ``torch.ops.dms.paged_attention``."""
    return torch.ops.dms.paged_attention(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len,
                                         ring_evict, window, ring_pages, scale)


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
) -> None:
    """Data movement of a store step (pages allocated beforehand): tokens leaving the window to the
    kept store if kept, the new tokens inside the window into their ring slots."""
    _runnable(k_new)
    from .triton.store_op import paged_store as launch

    launch(k_new, v_new, new_evict, k_pool, v_pool, page_table, ring_evict, lists, kept0, starts, n_new, window,
           ring_pages)


@paged_store.register_fake
def _(k_new, v_new, new_evict, k_pool, v_pool, page_table, ring_evict, lists, kept0, starts, n_new, window, ring_pages):
    return None


def paged_store_op(*args):
    return torch.ops.dms.paged_store(*args)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k norm, eviction logit, borrowed-channel zeroing, RoPE and the previous key's decision
    for the new tokens of one layer (``variant``: "borrowed", "adapter" or "none")."""
    _runnable(q_raw)
    from .triton.project_op import fused_project as launch

    q, k, logits = launch(q_raw, k_raw, cos, sin, num_kv_heads=num_kv_heads, q_norm_weight=q_norm_weight,
                          k_norm_weight=k_norm_weight, eps=eps, variant=None if variant == "none" else variant,
                          adapter_logits=adapter_logits, scale=scale, offset=offset, ring_evict=ring_evict,
                          lists=lists, starts=starts, n_new=n_new)
    if logits is None:
        logits = torch.zeros(k.shape[:3], dtype=torch.float32, device=k.device)
    return q, k, logits


@fused_project.register_fake
def _(q_raw, k_raw, cos, sin, q_norm_weight, k_norm_weight, adapter_logits, ring_evict, lists, starts, n_new,
      num_kv_heads, variant, eps, scale, offset):
    b, t, _ = q_raw.shape
    d = k_raw.shape[2] // num_kv_heads
    hq = q_raw.shape[2] // d
    return (q_raw.new_empty(b, hq, t, d), k_raw.new_empty(b, num_kv_heads, t, d),
            q_raw.new_empty(b, num_kv_heads, t, dtype=torch.float32))
