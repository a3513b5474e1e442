"""Torch-facing wrappers over the CPU kernels (``dms_kernels._cpu``, csrc/cpu/dms_cpu.cpp).

The fused paged attention reads the paged pool in place through the page table: the ring (with
the window rule), the kept store and the new chunk, one online softmax per query row, the query
heads of a GQA group sharing each K/V row; parallel over (sequence, KV head, query tile, split of
the held keys). The store moves a step's tokens as :func:`dms_kernels.ops.paged_store` defines.

The extension is built by ``setup.py`` where a C++ compiler and pybind11 exist
(``DMS_BUILD_CPU=0`` skips it); :func:`unavailable_reason` says why it cannot run. Tensors cross
as ``data_ptr()`` integers with their element strides; the work uses ``torch.get_num_threads()``
threads. Layouts: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import math

import torch

try:
    from . import _cpu  # type: ignore[attr-defined]
except ImportError as _e:  # not built on this machine
    _cpu = None
    _IMPORT_ERROR = str(_e)
else:
    _IMPORT_ERROR = None

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def built() -> bool:
    """Whether ``dms_kernels._cpu`` was compiled into this installation."""
    return _cpu is not None


def dtypes() -> tuple[torch.dtype, ...]:
    if _cpu is None:
        return ()
    return tuple(d for d in _DTYPE_CODES if d != torch.float16 or _cpu.f16_supported)


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the CPU kernels cannot run on ``device`` (None: they can)."""
    if device is not None and torch.device(device).type != "cpu":
        return f"the CPU kernels run on CPU tensors, got device {torch.device(device)}"
    if _cpu is None:
        return (f"dms_kernels._cpu is not built (reinstall with a C++ compiler and pybind11, "
                f"e.g. `make setup`): {_IMPORT_ERROR}")
    return None


def _require() -> None:
    why = unavailable_reason()
    if why is not None:
        raise RuntimeError(why)


def _dtype_code(name: str, dtype: torch.dtype) -> int:
    if dtype not in dtypes():
        raise ValueError(f"{name}: expected one of {list(dtypes())}, got {dtype}")
    return _DTYPE_CODES[dtype]


def _check(name: str, x, shape: tuple, dtype: torch.dtype | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape {shape}, got {type(x).__name__}")
    if tuple(x.shape) != shape or (dtype is not None and x.dtype != dtype):
        want = f"{dtype} of shape {shape}" if dtype is not None else f"shape {shape}"
        raise ValueError(f"{name}: expected {want}, got {x.dtype} {tuple(x.shape)}")
    if x.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU tensor, got device {x.device}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The last dimension contiguous (the kernels read rows with unit stride)."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _t(x: torch.Tensor) -> tuple:
    s = x.stride()
    return (x.data_ptr(), *s, *(0,) * (3 - len(s)))[:4]


def _pool(name: str, x, d: int, dtype: torch.dtype) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != d or x.dtype != dtype:
        raise ValueError(f"{name}: expected a contiguous [P, PS, {d}] {dtype} pool, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous [P, PS, {d}] pool, got strides {x.stride()}")
    if x.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU tensor, got device {x.device}")


def _check_window(window, ring_pages, page_size: int, table_width: int, table_name: str) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected an int >= 1, got {window!r}")
    if isinstance(ring_pages, bool) or not isinstance(ring_pages, int) or ring_pages * page_size < window:
        raise ValueError(f"ring_pages: expected an int >= ceil(window / page size) = {math.ceil(window / page_size)}, "
                         f"got {ring_pages!r}")
    if ring_pages > table_width:
        raise ValueError(f"{table_name}: expected at least ring_pages={ring_pages} columns, got {table_width}")


def paged_attention(q, k_new, v_new, new_evict, n_new, starts, k_pool, v_pool, table, kept_len, ring_evict,
                    window: int, ring_pages: int, scale: float | None = None) -> torch.Tensor:
    """DMS attention of the new tokens over the paged cache plus the new chunk; the arguments of
    ``torch.ops.dms.paged_attention``. Returns a contiguous tensor of q's shape and dtype; rows
    ``a >= n_new[b]`` (padding) are zeros.

    q ``[B, Hq, T, D]``; k_new/v_new ``[B, H, T, D]``; new_evict bool ``[B, H, T]``; n_new/starts
    int64 ``[B]``; k_pool/v_pool contiguous ``[P, PS, D]``; table int64 ``[B, H, R + K]``;
    kept_len int64 ``[B, H]``; ring_evict bool ``[B, H, window]``; ring_pages = R.
    """
    _require()
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q: expected a 4-D tensor [B, Hq, T, D], got {tuple(getattr(q, 'shape', ()))}")
    b, hq, t, d = q.shape
    code = _dtype_code("q", q.dtype)
    if q.device.type != "cpu":
        raise ValueError(f"q: expected a CPU tensor, got device {q.device}")
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if (not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != b or x.shape[2] != t or x.shape[3] != d
                or x.shape[1] < 1 or hq % x.shape[1]):
            raise ValueError(f"{name}: expected [B={b}, H, T={t}, D={d}] with Hq={hq} a multiple of H, "
                             f"got {tuple(getattr(x, 'shape', ()))}")
        if x.dtype != q.dtype or x.device.type != "cpu":
            raise ValueError(f"{name}: expected a CPU {q.dtype} tensor, got {x.dtype} on {x.device}")
    h = k_new.shape[1]
    if v_new.shape[1] != h:
        raise ValueError(f"v_new: expected the shape of k_new {tuple(k_new.shape)}, got {tuple(v_new.shape)}")
    _check("new_evict", new_evict, (b, h, t), torch.bool)
    _check("n_new", n_new, (b,), torch.int64)
    _check("starts", starts, (b,), torch.int64)
    _check("kept_len", kept_len, (b, h), torch.int64)
    if not isinstance(table, torch.Tensor) or table.dim() != 3 or tuple(table.shape[:2]) != (b, h) \
            or table.dtype != torch.int64:
        raise ValueError(f"table: expected int64 [B={b}, H={h}, TW], got {getattr(table, 'dtype', None)} "
                         f"{tuple(getattr(table, 'shape', ()))}")
    _pool("k_pool", k_pool, d, q.dtype)
    _pool("v_pool", v_pool, d, q.dtype)
    if v_pool.shape != k_pool.shape:
        raise ValueError(f"v_pool: expected the shape of k_pool {tuple(k_pool.shape)}, got {tuple(v_pool.shape)}")
    ps = k_pool.shape[1]
    _check_window(window, ring_pages, ps, table.shape[2], "table")
    _check("ring_evict", ring_evict, (b, h, window), torch.bool)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q, k_new, v_new = _rows(q), _rows(k_new), _rows(v_new)
    out = torch.empty((b, hq, t, d), dtype=q.dtype)
    _cpu.paged_attention(code, (b, h, hq // h, t, d, ps, window, ring_pages, table.shape[2], k_pool.shape[0]),
                         _t(q), _t(k_new), _t(v_new), _t(new_evict), _t(n_new), _t(starts), k_pool.data_ptr(),
                         v_pool.data_ptr(), _t(table), _t(kept_len), _t(ring_evict), out.data_ptr(), scale,
                         torch.get_num_threads())
    return out


def paged_store(k_new, v_new, new_evict, k_pool, v_pool, page_table, ring_evict, lists, kept0, starts, n_new,
                window: int, ring_pages: int) -> None:
    """The data movement of a store step (pages allocated beforehand), in place on the pools and
    ``ring_evict``: the arguments of ``torch.ops.dms.paged_store``.

    k_new/v_new ``[B, H, T, D]`` (the pools' dtype); new_evict bool ``[B, H, T]``; k_pool/v_pool
    contiguous ``[P, PS, D]``; page_table int64 ``[NL, R + K]`` and ring_evict bool ``[>= NL, window]``
    (the cache's whole tensors); lists/kept0 int64 ``[B, H]``; starts/n_new int64 ``[B]``.
    """
    _require()
    if not isinstance(k_new, torch.Tensor) or k_new.dim() != 4:
        raise ValueError(f"k_new: expected a 4-D tensor [B, H, T, D], got {tuple(getattr(k_new, 'shape', ()))}")
    b, h, t, d = k_new.shape
    _dtype_code("k_new", k_new.dtype)
    _check("k_new", k_new, (b, h, t, d), k_new.dtype)
    _check("v_new", v_new, (b, h, t, d), k_new.dtype)
    _check("new_evict", new_evict, (b, h, t), torch.bool)
    _pool("k_pool", k_pool, d, k_new.dtype)
    _pool("v_pool", v_pool, d, k_new.dtype)
    if v_pool.shape != k_pool.shape:
        raise ValueError(f"v_pool: expected the shape of k_pool {tuple(k_pool.shape)}, got {tuple(v_pool.shape)}")
    if not isinstance(page_table, torch.Tensor) or page_table.dim() != 2 or page_table.dtype != torch.int64:
        raise ValueError(f"page_table: expected int64 [NL, TW], got {getattr(page_table, 'dtype', None)} "
                         f"{tuple(getattr(page_table, 'shape', ()))}")
    nl = page_table.shape[0]
    ps = k_pool.shape[1]
    _check_window(window, ring_pages, ps, page_table.shape[1], "page_table")
    # the cache may keep spare rows past NL (targets of masked writes); the lists address rows < NL
    if (not isinstance(ring_evict, torch.Tensor) or ring_evict.dtype != torch.bool or ring_evict.dim() != 2
            or ring_evict.shape[0] < nl or ring_evict.shape[1] != window):
        raise ValueError(f"ring_evict: expected torch.bool of shape (>= {nl}, {window}), got "
                         f"{getattr(ring_evict, 'dtype', None)} {tuple(getattr(ring_evict, 'shape', ()))}")
    _check("lists", lists, (b, h), torch.int64)
    _check("kept0", kept0, (b, h), torch.int64)
    _check("starts", starts, (b,), torch.int64)
    _check("n_new", n_new, (b,), torch.int64)
    if page_table.device.type != "cpu":
        raise ValueError(f"page_table: expected a CPU tensor, got device {page_table.device}")
    k_new, v_new = _rows(k_new), _rows(v_new)
    _cpu.paged_store(k_new.element_size(), (b, h, t, d, ps, window, ring_pages, page_table.shape[1], k_pool.shape[0], nl),
                     _t(k_new), _t(v_new), _t(new_evict), k_pool.data_ptr(), v_pool.data_ptr(), _t(page_table),
                     _t(ring_evict), _t(lists), _t(kept0), _t(starts), _t(n_new), torch.get_num_threads())
