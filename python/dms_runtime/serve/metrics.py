"""Prometheus metrics of one server, in a registry of its own (never the process-global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# seconds: a step on a CPU takes tens of milliseconds, on a GPU a few
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, page_size: int, num_pages: int):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("dms_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("dms_requests_waiting", "Sequences waiting for a slot or pages", registry=r)
        self.prompt_tokens = Counter("dms_prompt_tokens", "Prompt tokens received (once per prompt)", registry=r)
        self.prefill_tokens = Counter("dms_prefill_tokens_computed",
                                      "Prompt tokens that went through the model (samples sharing a prompt's pages "
                                      "do not recompute it; preempted sequences do)", registry=r)
        self.generation_tokens = Counter("dms_generation_tokens", "Tokens generated", registry=r)
        self.steps = Counter("dms_engine_steps", "Engine steps (forward passes)", registry=r)
        self.preemptions = Counter("dms_preemptions", "Sequences preempted (pages freed, recomputed later)",
                                   registry=r)
        self.finished = Counter("dms_sequences_finished", "Sequences finished, by engine finish reason",
                                ["reason"], registry=r)
        self.rejected = Counter("dms_requests_rejected", "Requests refused before they ran, by reason", ["reason"],
                                registry=r)
        self.pages_total = Gauge("dms_kv_pages_total", "Pages in the KV pool", registry=r)
        self.pages_used = Gauge("dms_kv_pages_used", "KV pool pages in use", registry=r)
        self.pages_free = Gauge("dms_kv_pages_free", "KV pool pages free", registry=r)
        self.page_size = Gauge("dms_kv_page_size_tokens", "Tokens per page", registry=r)
        self.live_tokens = Gauge("dms_kv_live_tokens",
                                 "KV tokens the running sequences hold (summed over layers and KV heads)", registry=r)
        self.dense_tokens = Gauge("dms_kv_dense_tokens",
                                  "KV tokens a dense cache would hold for the running sequences", registry=r)
        self.ttft = Histogram("dms_time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("dms_inter_token_latency_seconds", "Time between two tokens of a sequence",
                             buckets=_LATENCY, registry=r)
        self.request_latency = Histogram("dms_request_latency_seconds", "Arrival to the last token of a request",
                                         buckets=_LATENCY, registry=r)
        info = Gauge("dms_model_info", "The served model", ["model"], registry=r)
        info.labels(model=model_name).set(1)
        self.pages_total.set(num_pages)
        self.pages_free.set(num_pages)
        self.page_size.set(page_size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
