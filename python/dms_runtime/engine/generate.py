"""``generate()`` through the serving engine and the paged cache."""

from __future__ import annotations

import dataclasses
import time

import torch

from ..models.decoder import DecoderLM
from ..outputs import RequestOutput
from ..paged.budget import PageBudget
from ..paged.cache import PagedConfig
from ..sampling import SamplingParams
from ..stats import GenerationStats, KVFootprint
from .engine import Engine


def generate_paged(
    model: DecoderLM,
    prompt_ids: list[list[int]],
    params: SamplingParams,
    *,
    eos_ids: set[int],
    tokenizer=None,
    n: int = 1,
    config: PagedConfig | None = None,
) -> tuple[list[RequestOutput], GenerationStats]:
    """Run every prompt (``n`` samples each) to completion; outputs are prompt-major."""
    cfg = model.config
    total = len(prompt_ids) * n
    if config is None:
        config = PagedConfig(max_seqs=total)
    longest = max(len(p) for p in prompt_ids) + params.max_new_tokens
    if config.max_model_len is None:
        config = dataclasses.replace(config, max_model_len=longest)
    if config.num_pages is None and config.kv_memory_bytes is None:
        # enough for every sequence with nothing evicted: a plain call never preempts
        w = cfg.dms.window_size if cfg.dms_active else config.page_size  # the cache's ring size
        per_seq = PageBudget(cfg.num_layers, cfg.num_kv_heads, w, config.page_size).worst_case_pages(longest)
        config = dataclasses.replace(config, num_pages=per_seq * total)
    t0 = time.perf_counter()
    engine = Engine(model, config, eos_ids=eos_ids, tokenizer=tokenizer)
    ids = [engine.add_request(p, params, n=n) for p in prompt_ids]
    engine.run()
    elapsed = time.perf_counter() - t0
    outputs = [engine.outputs[i] for group in ids for i in group]
    failed = next((o.error for o in outputs if o.error is not None), None)
    if failed is not None:
        raise failed
    st = engine.stats
    live = torch.tensor([o.live_tokens for o in outputs], dtype=torch.int64)
    lengths = [len(o.prompt_token_ids) + len(o.token_ids) - 1 for o in outputs]
    n_gen = sum(len(o.token_ids) for o in outputs)
    cache = engine.cache
    stats = GenerationStats(
        prompt_tokens=sum(len(p) for p in prompt_ids) * n,
        generated_tokens=n_gen,
        elapsed_s=elapsed,
        prefill_s=st.prefill_s,
        decode_s=st.decode_s,
        tokens_per_s=n_gen / max(elapsed, 1e-9),
        decode_tokens_per_s=st.decode_tokens / max(st.decode_s, 1e-9),
        # live is [B, L, Hkv] over all heads, also with tensor parallelism (gathered from the ranks)
        kv=KVFootprint.from_live(getattr(getattr(model, "tp", None), "full_config", cfg), live, lengths,
                                 model.dtype.itemsize),
        eviction=cfg.dms_active,
        window=cfg.dms.window_size if cfg.dms_active else None,
        backend=f"paged/{engine.attention_name}",
        kernels=dict(st.kernels),
        extra={
            "page_size": cache.ps,
            "num_pages": cache.P,
            "defer_budget": cache.pcfg.defer_budget if cache.defers else 0,
            "pool_peak_bytes": cache.peak_pages * cache.ps * cache.token_bytes,
            "pool_final_bytes": cache.bytes_in_use,
            "dense_peak_bytes": st.peak_dense_bytes,
            "kv_bytes_read": st.kv_bytes_read,
            "kv_bytes_read_dense": st.kv_bytes_read_dense,
            "kv_bytes_read_per_decode_step": st.decode_kv_bytes_read / max(st.decode_steps, 1),
            "steps": st.steps,
            "prefill_steps": st.prefill_steps,
            "decode_steps": st.decode_steps,
            "preemptions": engine.scheduler.preemptions,
        },
    )
    if getattr(model, "tp", None) is not None:  # pool counters above are rank 0's; these are every rank's
        from ..parallel import rank_stats

        stats.extra["ranks"] = rank_stats(engine)
    return outputs, stats
