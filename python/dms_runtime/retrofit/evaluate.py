"""Fidelity of a DMS model to its vanilla self, and the compression it achieves.

Teacher-forced on held-out text of a given length: KL(dms || vanilla) per token, greedy
next-token agreement, and live tokens / total per (layer, KV head) at the end (the minimum a
cache must hold, semantics §3). Passkey retrieval accuracy through generate().
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch

from dms_kernels import reference as ref

from ..attention import FullSequenceAttention
from .attention import eviction_off
from .data import pack, passkey_task, stdlib_documents, variable_tracking_task
from .losses import distillation_kl


@dataclass(slots=True)
class FidelityRow:
    length: int
    sequences: int
    kl_per_token: float
    greedy_agreement: float
    live_fraction: float  # live tokens / total at the end, over layers, heads and sequences
    compression_ratio: float
    live_fraction_per_layer: list[float]
    peak_live_fraction: float  # the most tokens held at any point / a dense cache's final size
    read_fraction: float  # K/V tokens read by all queries / what dense attention reads
    passkey_accuracy_dms: float | None = None
    passkey_accuracy_vanilla: float | None = None
    vartrack_accuracy_dms: float | None = None
    vartrack_accuracy_vanilla: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def fidelity(lm, length: int, sequences: int = 2, seed: int = 1234) -> FidelityRow:
    """Compare the model with eviction on and off on ``sequences`` stdlib texts of ``length`` tokens."""
    model, cfg = lm.model, lm.config
    if not cfg.dms_active:
        raise ValueError("model: fidelity needs a DMS model with eviction on")
    seqs = []
    for s in pack(stdlib_documents(seed=seed), lm.tokenizer, length):
        seqs.append(s)
        if len(seqs) == sequences:
            break
    kls, agree, live, total = [], [], torch.zeros(cfg.num_layers, dtype=torch.float64), 0
    peak, reads, dense_reads = 0.0, 0.0, 0.0
    w = cfg.dms.window_size
    for s in seqs:
        ids = torch.tensor([s], device=model.device)
        pos = torch.arange(length, device=model.device)[None]
        with eviction_off(model):
            vanilla = model(ids, pos, FullSequenceAttention())
        backend = FullSequenceAttention(cfg.dms.window_size, record=True)
        dms = model(ids, pos, backend)
        kls.append(distillation_kl(dms, vanilla).item())
        agree.append((dms.argmax(-1) == vanilla.argmax(-1)).float().mean().item())
        held_over_time = 0
        for layer in range(cfg.num_layers):
            d = backend.decisions[layer]  # [1, H, T]
            live[layer] += ref.live_tokens(d, w, length - 1).sum().item()
            # held after position t: min(t + 1, w) + kept tokens older than the window
            keep_old = torch.cumsum((~d).long(), -1)  # kept among 0..t
            t = torch.arange(length)
            older = torch.where(t - w >= 0, keep_old[..., (t - w).clamp(min=0)], torch.zeros_like(keep_old))
            held_over_time = held_over_time + (torch.clamp(t + 1, max=w) + older).sum(1)  # [1, T] summed over heads
            reads += ref.visibility_mask(d, w).sum().item()
        peak = max(peak, float(held_over_time.max()) / (length * cfg.num_kv_heads * cfg.num_layers))
        dense_reads += cfg.num_layers * cfg.num_kv_heads * length * (length + 1) / 2
        total += length * cfg.num_kv_heads
    per_layer = (live / max(total, 1)).tolist()
    frac = float(live.sum() / max(total * cfg.num_layers, 1))
    return FidelityRow(length, len(seqs), sum(kls) / len(kls), sum(agree) / len(agree), frac,
                       1.0 / frac if frac else float("inf"), per_layer, peak, reads / max(dense_reads, 1))


def passkey_accuracy(lm, length: int, trials: int = 4, seed: int = 99) -> tuple[float, float]:
    """Greedy retrieval of a 5-digit pass key hidden in ~``length`` tokens: (DMS, vanilla) accuracy."""
    return task_accuracy(lm, length, lambda n, rng: passkey_task(n, rng), trials, seed)


def vartrack_accuracy(lm, length: int, trials: int = 4, seed: int = 77, hops: int = 3) -> tuple[float, float]:
    """Variable tracking over ``hops`` chained assignments in ~``length`` tokens: (DMS, vanilla) accuracy."""
    return task_accuracy(lm, length, lambda n, rng: variable_tracking_task(n, hops, rng), trials, seed)


def task_accuracy(lm, length: int, make_task, trials: int, seed: int) -> tuple[float, float]:
    """Greedy answers to synthetic tasks of about ``length`` tokens, with eviction on and off."""
    from ..api import generate

    rng = random.Random(seed)
    prompts, keys = [], []
    for _ in range(trials):
        n = max(8, length // 2)
        while True:
            text, answer = make_task(n, rng)
            ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= length or n <= 8:
                break
            n = int(n * 0.8)
        prompts.append(ids[-length:])
        keys.append(answer.strip())
    scores = []
    for off in (False, True):
        if off:
            with eviction_off(lm.model):
                res = generate(lm, prompts, max_new_tokens=8, ignore_eos=True)
        else:
            res = generate(lm, prompts, max_new_tokens=8, ignore_eos=True)
        scores.append(sum(k in (t or "") for k, t in zip(keys, res.texts)) / trials)
    return scores[0], scores[1]
