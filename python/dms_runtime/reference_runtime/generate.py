"""The reference generation loop: right-padded prefill, then one token per step for every row."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..models.decoder import DecoderLM
from ..sampling import Sampler, SamplingParams
from ..stats import GenerationStats, KVFootprint
from .cache import DenseDMSCache


@dataclass(slots=True)
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens (an EOS or stop token that ended it included)
    text: str | None
    finish_reason: str  # "eos" | "stop" | "length"
    live_tokens: list[list[int]]  # [L][Hkv] at the end


class StopChecker:
    """Per request: EOS / stop tokens / stop strings / length."""

    def __init__(self, params: SamplingParams, eos_ids: set[int], tokenizer):
        self.params = params
        self.eos_ids = set() if params.ignore_eos else set(eos_ids)
        self.stop_ids = set(params.stop_token_ids)
        self.tokenizer = tokenizer
        if params.stop and tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer; pass stop_token_ids instead")

    def check(self, generated: list[int]) -> str | None:
        last = generated[-1]
        if last in self.eos_ids:
            return "eos"
        if last in self.stop_ids:
            return "stop"
        if self.params.stop:
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            if any(s in text for s in self.params.stop):
                return "stop"
        if len(generated) >= self.params.max_new_tokens:
            return "length"
        return None

    def text(self, generated: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.params.stop if s in text), default=-1)
        return text[:cut] if cut >= 0 else text


def _check_finite(logits: torch.Tensor, step: int) -> None:
    bad = ~torch.isfinite(logits).all(dim=-1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise FloatingPointError(
            f"logits: non-finite values at generation step {step} for prompts {rows} "
            "(check the weights and the dtype; bf16/fp16 overflow is a common cause)"
        )


@torch.inference_mode()
def generate_reference(
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
        _check_finite(logits[[i for i in range(b) if finish[i] is None]], step)
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
        backend="reference",
    )
    return outputs, stats
