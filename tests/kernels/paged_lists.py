"""Decode test helpers shared by the Triton and CUDA kernel tests: a random paged cache, each
list's held tokens in the kernels' logical order, and the expected decode output through
dms_kernels.reference."""

import torch

from dms_kernels import reference as ref


def random_cache(b, h, d, ps, w, n_ring, kept, dtype, device="cpu", seed=None):
    """A pool with the lists' tokens scattered over shuffled pages (plus spares); returns the K/V
    pools [P, PS, D], the page table [B, H, TW] (ring pages, then kept-store pages) and R."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    R = -(-w // ps)
    kcols = -(-int(kept.max()) // ps) if kept.numel() else 0
    tw = R + max(kcols, 1)
    n_pages = b * h * tw + 3
    it = iter(torch.randperm(n_pages, generator=g).tolist())
    k_pool = torch.randn(n_pages, ps, d, generator=g).to(device, dtype)
    v_pool = torch.randn(n_pages, ps, d, generator=g).to(device, dtype)
    table = torch.full((b, h, tw), -1, dtype=torch.int64)
    for bi in range(b):
        for hi in range(h):
            for c in range(-(-int(n_ring[bi]) // ps)):
                table[bi, hi, c] = next(it)
            for c in range(-(-int(kept[bi, hi]) // ps)):
                table[bi, hi, R + c] = next(it)
    return k_pool, v_pool, table.to(device), R


def dense_lists(k_pool, v_pool, table, n_ring, kept, R):
    """Each list's held tokens on CPU, [B, H, n_max + 1, D] (ring slots, then kept tokens), and
    their counts [B, H]."""
    k_pool, v_pool, table, n_ring, kept = (x.cpu() for x in (k_pool, v_pool, table, n_ring, kept))
    b, h, _ = table.shape
    ps, d = k_pool.shape[1], k_pool.shape[2]
    lens = n_ring[:, None] + kept
    n = int(lens.max()) if lens.numel() else 0
    k = torch.zeros(b, h, n + 1, d, dtype=k_pool.dtype)
    v = torch.zeros_like(k)
    for bi in range(b):
        for hi in range(h):
            i = torch.arange(int(lens[bi, hi]))
            j = i - n_ring[bi]
            in_ring = i < n_ring[bi]
            pages = table[bi, hi, torch.where(in_ring, i // ps, R + torch.div(j, ps, rounding_mode="floor"))]
            offs = torch.where(in_ring, i % ps, j % ps)
            k[bi, hi, : len(i)], v[bi, hi, : len(i)] = k_pool[pages, offs], v_pool[pages, offs]
    return k, v, lens


def reference_decode(q, k_new, v_new, k_lists, v_lists, lens):
    """Each list as its own row: held tokens then the new token (k_new/v_new None: none), all
    visible (decode), in float64 on CPU. A query with no token at all gets zeros."""
    q = q.cpu()
    b, hq, d = q.shape
    h = lens.shape[1]
    g = hq // h
    extra = 0 if k_new is None else 1
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            n = int(lens[bi, hi])
            kk, vv = k_lists[bi, hi, :n], v_lists[bi, hi, :n]
            if extra:
                kk, vv = torch.cat([kk, k_new[bi, hi].cpu()[None]]), torch.cat([vv, v_new[bi, hi].cpu()[None]])
            if n + extra == 0:
                continue
            qq = q[bi, hi * g : (hi + 1) * g][None, :, None].double()
            dec = torch.zeros(1, 1, n + extra, dtype=torch.bool)
            o = ref.dms_attention_cached(qq, kk[None, None].double(), vv[None, None].double(), dec, 1,
                                         torch.tensor([[n]]), torch.tensor([n + extra]))
            out[bi, hi * g : (hi + 1) * g] = o[0, :, 0]
    return out
