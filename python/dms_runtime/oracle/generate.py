"""The oracle generation loop: right-padded prefill, then one token per step for every row."""

from __future__ import annotations

import time
import torch

from ..models.decoder import DecoderLM
from ..outputs import RequestOutput, StopChecker, check_finite
from ..sampling import Sampler, SamplingParams
from ..stats import GenerationStats, KVFootprint
from .cache import DenseDMSCache


@torch.inference_mode()
def generate_oracle(
    model: DecoderLM,
    prompt_ids: list[list[int]],
    params: SamplingParams,
    *,
    eos_ids: set[int],
    tokenizer=None,
) -> tuple[list[RequestOutput], GenerationStats]:
    cfg = model.config
    device = model.device
    b = len(prompt_ids)
    lens = [len(p) for p in prompt_ids]
    capacity = max(n + params.max_new_tokens for n in lens)
    t0 = time.perf_counter()

    cache = DenseDMSCache(cfg, b, capacity, model.dtype, device)
    sampler = Sampler(params, b)
    stops = StopChecker(params, eos_ids, tokenizer)

    tmax = max(lens)
    ids = torch.zeros((b, tmax), dtype=torch.int64, device=device)
    for i, p in enumerate(prompt_ids):
        ids[i, : len(p)] = torch.tensor(p, dtype=torch.int64)
    positions = torch.arange(tmax, device=device).expand(b, tmax)
    len_t = torch.tensor(lens, device=device)
    valid = positions < len_t[:, None]
    logits = model(ids, positions, cache.step(positions, valid), logits_index=len_t - 1)[:, 0].float()
    cache.advance(valid)
    t_prefill = time.perf_counter()

    generated: list[list[int]] = [[] for _ in range(b)]
    finish: list[str | None] = [None] * b
    step = 0
    while True:
        alive_rows = [i for i in range(b) if finish[i] is None]
        check_finite(logits[alive_rows], step, alive_rows)
        for i in range(b):
            if finish[i] is None:
                generated[i].append(sampler(i, logits[i]))
                finish[i] = stops.check(generated[i])
        if all(f is not None for f in finish):
            break
        step += 1
        alive = torch.tensor([f is None for f in finish], device=device)
        next_ids = torch.tensor([g[-1] for g in generated], dtype=torch.int64, device=device)[:, None]
        pos = cache.lengths[:, None].clone()
        logits = model(next_ids, pos, cache.step(pos, alive[:, None]))[:, 0].float()
        cache.advance(alive[:, None])
    t_end = time.perf_counter()

    live = cache.live_tokens()  # [B, L, Hkv]
    outputs = [
        RequestOutput(
            prompt_token_ids=list(prompt_ids[i]),
            token_ids=generated[i],
            text=stops.text(generated[i]),
            finish_reason=finish[i],
            live_tokens=live[i].tolist(),
        )
        for i in range(b)
    ]
    n_gen = sum(len(g) for g in generated)
    decode_s = t_end - t_prefill
    stats = GenerationStats(
        prompt_tokens=sum(lens),
        generated_tokens=n_gen,
        elapsed_s=t_end - t0,
        prefill_s=t_prefill - t0,
        decode_s=decode_s,
        tokens_per_s=n_gen / max(t_end - t0, 1e-9),
        decode_tokens_per_s=max(n_gen - b, 0) / max(decode_s, 1e-9),
        kv=KVFootprint.from_live(cfg, live, cache.lengths.tolist(), model.dtype.itemsize),
        eviction=cfg.dms_active,
        window=cfg.dms.window_size if cfg.dms_active else None,
        backend="oracle",
    )
    return outputs, stats
