"""Torch-facing wrappers over the hand-written CUDA kernels (``dms_kernels._cuda``, sm_90a).

The extension is optional: it is built only where nvcc exists. ``available()`` says whether
it was built and a device can run it; without a device every call raises a clear error.
Tensors cross as ``data_ptr()`` integers with their strides; kernels run on the current
stream of the tensors' device. Layouts: docs/ARCHITECTURE.md, csrc/include/dms/dms.h.
"""

from __future__ import annotations

import functools
import math

import torch

try:
    from . import _cuda  # type: ignore[attr-defined]
except ImportError as _e:  # not built on this machine
    _cuda = None
    _IMPORT_ERROR = str(_e)
else:
    _IMPORT_ERROR = None


def built() -> bool:
    """Whether the CUDA module was compiled into this installation."""
    return _cuda is not None


def device_count() -> int:
    return _cuda.device_count() if _cuda is not None else 0


def available() -> bool:
    return built() and device_count() > 0


def _require() -> None:
    if _cuda is None:
        raise RuntimeError(f"dms_kernels._cuda is not built (install with nvcc present, DMS_BUILD_CUDA=1): {_IMPORT_ERROR}")


def eviction_decisions(logits: torch.Tensor) -> torch.Tensor:
    """CUDA version of :func:`dms_kernels.reference.eviction_decisions` for float32 ``[B, Hkv, T]``."""
    _require()
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits: expected a 3-D tensor [B, Hkv, T], got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype != torch.float32:
        raise ValueError(f"logits: expected dtype torch.float32, got {logits.dtype}")
    if logits.device.type != "cuda":
        raise ValueError(f"logits: expected a CUDA tensor, got device {logits.device}")
    logits = logits.contiguous()
    out = torch.empty(logits.shape, dtype=torch.uint8, device=logits.device)
    b, h, t = logits.shape
    stream = torch.cuda.current_stream(logits.device).cuda_stream
    _cuda.eviction_decisions(logits.data_ptr(), out.data_ptr(), b * h, t, stream)
    return out.bool()


# ----------------------------------------------------------------------------- paged cache kernels

DECODE_HEAD_DIMS = (64, 128)
DECODE_DTYPES = (torch.float16, torch.bfloat16)
DECODE_MAX_GROUP = 16
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def hopper(device: torch.device) -> bool:
    """A CUDA device the sm_90a kernels run on (compute capability 9.0)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) == (9, 0)


def unavailable_reason(device: torch.device) -> str | None:
    """Why the hand-written kernels cannot run on ``device`` (None: they can). They need the
    built module, a CUDA device it can see, and compute capability 9.0 (sm_90a code only).
    Asked on every op call, so the answer is cached per device."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the CUDA kernels run on CUDA tensors, got device {device}"
    if _cuda is None:
        return f"dms_kernels._cuda is not built (install where nvcc exists): {_IMPORT_ERROR}"
    if device_count() == 0 or not torch.cuda.is_available():
        return "no CUDA device"
    return _device_reason(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_reason(index: int) -> str | None:
    cc = torch.cuda.get_device_capability(index)
    return None if cc == (9, 0) else f"the kernels are built for sm_90a (Hopper), this GPU is sm_{cc[0]}{cc[1]}"


def decode_supported(dtype: torch.dtype, head_dim: int, group: int) -> bool:
    """Whether the CUDA decode kernels cover this configuration (else callers use Triton)."""
    return dtype in DECODE_DTYPES and head_dim in DECODE_HEAD_DIMS and 1 <= group <= DECODE_MAX_GROUP


def store_supported(dtype: torch.dtype, head_dim: int) -> bool:
    """The store kernel moves 16-byte pieces: rows must be a multiple of 16 bytes."""
    return dtype in _DTYPE_NAMES and (head_dim * dtype.itemsize) % 16 == 0


def _dtype_code(dtype: torch.dtype):
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype: expected one of {list(_DTYPE_NAMES)}, got {dtype}")
    return getattr(_cuda.DataType, _DTYPE_NAMES[dtype])


@functools.lru_cache(maxsize=None)
def num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_plan(num_lists: int, group: int, head_dim: int, dtype: torch.dtype, max_tokens: int, sms: int = 132):
    """Host-side plan of a decode step (``dms_decode_plan``): splits, tiles, workspace bytes.
    Needs no device; make it once per step and pass it to every layer's call."""
    _require()
    return _cuda.decode_plan(num_lists, group, head_dim, _dtype_code(dtype), max_tokens, sms)


@functools.lru_cache(maxsize=64)
def _cached_plan(num_lists: int, group: int, head_dim: int, dtype: torch.dtype, max_tokens: int, sms: int):
    return decode_plan(num_lists, group, head_dim, dtype, max_tokens, sms)


def cached_decode_plan(num_lists: int, group: int, head_dim: int, dtype: torch.dtype, max_tokens: int,
                       device: torch.device):
    """:func:`decode_plan` for a step whose lengths the caller bounds on the host: made once per
    (shape, bound) and reused by every layer of the step (no host sync)."""
    dev = torch.device(device)
    return _cached_plan(num_lists, group, head_dim, dtype, max_tokens,
                        num_sms(dev.index if dev.index is not None else torch.cuda.current_device()))


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _check(name, t, ndim, dtype=None, device=None):
    if not isinstance(t, torch.Tensor) or t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {getattr(t, 'shape', type(t))}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")


def _check_pools(k_pool, v_pool, dtype, d, dev) -> None:
    """The K/V page pools ``[P, PS, D]``: same shape and strides, unit stride in the head dim."""
    for name, x in (("k_pool", k_pool), ("v_pool", v_pool)):
        _check(name, x, 3, dtype, dev)
        if x.shape[2] != d or x.stride(2) != 1:
            raise ValueError(f"{name}: expected [P, PS, {d}] with unit stride in the head dim, got {tuple(x.shape)}")
    if k_pool.shape != v_pool.shape or k_pool.stride() != v_pool.stride():
        raise ValueError("k_pool/v_pool: expected the same shape and strides")


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """x itself when its rows suit 16-byte loads (unit last stride, 16-byte aligned address and
    strides), else a fresh contiguous copy (the allocator aligns it)."""
    esz = x.element_size()
    ok = x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all((st * esz) % 16 == 0 for st in x.stride()[:-1])
    return x if ok else x.clone(memory_format=torch.contiguous_format)


def _shared_layout(k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k_new and v_new as the C ABI takes them: 16-byte rows and one set of strides for both (the
    runtime's k comes fresh from the projection kernel while v is a transposed view of v_proj)."""
    k_new, v_new = _aligned(k_new), _aligned(v_new)
    if k_new.stride() != v_new.stride():
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    return k_new, v_new


def paged_decode_attention(q, k_new, v_new, k_pool, v_pool, table, starts, kept_len, window: int, ring_pages: int,
                           scale: float | None = None, plan=None) -> torch.Tensor:
    """One new query per sequence over the tokens its KV head holds plus its own new key.

    q ``[B, Hq, D]``; k_new/v_new ``[B, H, D]`` (both None: the cache only, and a query whose
    list is empty gets zeros); k_pool/v_pool ``[P, PS, D]``; table ``[B, H, TW]`` int64 page ids;
    starts ``[B]`` int64 positions processed (the ring holds ``min(start, window)``); kept_len
    ``[B, H]`` int64. ``plan``: from :func:`decode_plan` (made here from the longest list, one
    host sync, when None). Returns ``[B, Hq, D]`` in q's dtype.
    """
    _require()
    _check("q", q, 3)
    dev = q.device
    if dev.type != "cuda":
        raise ValueError(f"q: expected a CUDA tensor, got device {dev}")
    b, hq, d = q.shape
    _check("table", table, 3, torch.int64, dev)
    h = table.shape[1]
    if table.shape[0] != b or h == 0 or hq % h:
        raise ValueError(f"table: expected [B={b}, H, TW] with Hq={hq} a multiple of H, got {tuple(table.shape)}")
    g = hq // h
    if not decode_supported(q.dtype, d, g):
        raise ValueError(f"q: the CUDA decode kernels take fp16/bf16, head dim 64 or 128 and a group of at most "
                         f"{DECODE_MAX_GROUP}, got {q.dtype}, head dim {d}, group {g}")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new/v_new: pass both or neither")
    if k_new is not None:
        for name, x in (("k_new", k_new), ("v_new", v_new)):
            _check(name, x, 3, q.dtype, dev)
            if tuple(x.shape) != (b, h, d):
                raise ValueError(f"{name}: expected shape {(b, h, d)}, got {tuple(x.shape)}")
        k_new, v_new = _shared_layout(k_new, v_new)
    _check_pools(k_pool, v_pool, q.dtype, d, dev)
    _check("starts", starts, 1, torch.int64, dev)
    _check("kept_len", kept_len, 2, torch.int64, dev)
    if starts.shape[0] != b or tuple(kept_len.shape) != (b, h):
        raise ValueError(f"starts/kept_len: expected [{b}] and [{b}, {h}], got {tuple(starts.shape)}, {tuple(kept_len.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q = _aligned(q)
    tab = table.reshape(b * h, -1)
    tab = tab if tab.stride(1) == 1 else tab.contiguous()
    kept = kept_len.reshape(-1).contiguous()
    starts = starts.contiguous()
    if plan is None:  # one host sync: the plan's bound, and the lengths checked against the table
        lo, kept_max, n_max = (torch.stack([torch.minimum(starts.min(), kept_len.min()), kept_len.max(),
                                            (torch.clamp(starts, max=window)[:, None] + kept_len).max()]).tolist()
                               if b else (0, 0, 0))
        cap = (tab.shape[1] - ring_pages) * k_pool.shape[1]
        if lo < 0 or kept_max > cap:
            raise ValueError(f"starts/kept_len: expected >= 0 and kept_len <= (table width - ring_pages) * page_size "
                             f"= {cap}, got min {lo}, kept_len max {kept_max}")
        plan = decode_plan(b * h, g, d, q.dtype, n_max, num_sms(dev.index if dev.index is not None else torch.cuda.current_device()))
    out = torch.empty((b, hq, d), dtype=q.dtype, device=dev)
    ws = torch.empty(max(plan.workspace_bytes, 16), dtype=torch.uint8, device=dev)
    with torch.cuda.device(dev):  # the C ABI launches on the current device
        _cuda.paged_decode(
            plan, _stream(dev), dtype=_dtype_code(q.dtype), batch=b, num_kv_heads=h, group_size=g, head_dim=d,
            page_size=k_pool.shape[1], window=window, ring_pages=ring_pages, table_width=tab.shape[1], scale=scale,
            q=q.data_ptr(), q_stride_b=q.stride(0), q_stride_h=q.stride(1),
            k_new=k_new.data_ptr() if k_new is not None else 0, v_new=v_new.data_ptr() if v_new is not None else 0,
            new_stride_b=k_new.stride(0) if k_new is not None else 0, new_stride_h=k_new.stride(1) if k_new is not None else 0,
            k_pool=k_pool.data_ptr(), v_pool=v_pool.data_ptr(), pool_stride_page=k_pool.stride(0),
            pool_stride_token=k_pool.stride(1), table=tab.data_ptr(), table_stride=tab.stride(0),
            seq_start=starts.data_ptr(), kept_len=kept.data_ptr(), out=out.data_ptr(), out_stride_b=out.stride(0),
            out_stride_h=out.stride(1), workspace=ws.data_ptr(), workspace_bytes=ws.numel(),
        )
    return out


def paged_store(k_new, v_new, new_evict, k_pool, v_pool, page_table, ring_evict, lists, kept0, starts, n_new,
                window: int, ring_pages: int) -> None:
    """The data movement of ``PagedKVCache.store`` (same arguments as the Triton mover):
    ``page_table`` ``[NL, TW]`` and ``ring_evict`` bool ``[NL, w]`` are the cache's whole tensors;
    ``lists``/``kept0`` ``[B, H]`` int64; k_new/v_new ``[B, H, T, D]``; new_evict bool ``[B, H, T]``;
    starts/n_new ``[B]`` int64. Updates k_pool, v_pool and ring_evict in place."""
    _require()
    _check("k_new", k_new, 4)
    dev = k_new.device
    if dev.type != "cuda":
        raise ValueError(f"k_new: expected a CUDA tensor, got device {dev}")
    b, h, t, d = k_new.shape
    _check("v_new", v_new, 4, k_new.dtype, dev)
    _check("new_evict", new_evict, 3, torch.bool, dev)
    if v_new.shape != k_new.shape or tuple(new_evict.shape) != (b, h, t):
        raise ValueError(f"v_new/new_evict: expected {tuple(k_new.shape)} and {(b, h, t)}, got "
                         f"{tuple(v_new.shape)}, {tuple(new_evict.shape)}")
    _check_pools(k_pool, v_pool, k_new.dtype, d, dev)
    _check("page_table", page_table, 2, torch.int64, dev)
    _check("ring_evict", ring_evict, 2, torch.bool, dev)
    if ring_evict.shape[1] != window or ring_evict.stride(1) != 1 or page_table.stride(1) != 1:
        raise ValueError(f"ring_evict/page_table: expected bool [NL, {window}] and int64 [NL, TW] with unit column "
                         f"stride, got {tuple(ring_evict.shape)}, {tuple(page_table.shape)}")
    for name, x, shape in (("lists", lists, (b, h)), ("kept0", kept0, (b, h)), ("starts", starts, (b,)),
                           ("n_new", n_new, (b,))):
        _check(name, x, len(shape), torch.int64, dev)
        if tuple(x.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(x.shape)}")
    if b * h == 0 or t == 0:
        return
    k_new, v_new = _shared_layout(k_new, v_new)
    ev = new_evict.contiguous().view(torch.uint8)
    lists, kept0, starts, n_new = lists.contiguous(), kept0.contiguous(), starts.contiguous(), n_new.contiguous()
    with torch.cuda.device(dev):  # the C ABI launches on the current device
        _cuda.paged_store(
            _stream(dev), dtype=_dtype_code(k_new.dtype), batch=b, num_kv_heads=h, head_dim=d, page_size=k_pool.shape[1],
            window=window, ring_pages=ring_pages, table_width=page_table.shape[1], num_new=t,
            k_new=k_new.data_ptr(), v_new=v_new.data_ptr(), new_stride_b=k_new.stride(0), new_stride_h=k_new.stride(1),
            new_stride_t=k_new.stride(2), new_evict=ev.data_ptr(), evict_stride_b=ev.stride(0), evict_stride_h=ev.stride(1),
            k_pool=k_pool.data_ptr(), v_pool=v_pool.data_ptr(), pool_stride_page=k_pool.stride(0),
            pool_stride_token=k_pool.stride(1), page_table=page_table.data_ptr(), table_stride=page_table.stride(0),
            ring_evict=ring_evict.data_ptr(), ring_evict_stride=ring_evict.stride(0), lists=lists.data_ptr(),
            kept0=kept0.data_ptr(), seq_start=starts.data_ptr(), n_new=n_new.data_ptr(),
        )
