"""``dms serve`` against the official openai client: answers equal dms_runtime.generate(), samples share
the prompt's pages, concurrent streams, a client that goes away, metrics, a full queue."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .serve_helpers import API_KEY, CHAT, MAX_SEQS, MAX_TOKENS, MAX_WAITING, MODEL, PROMPTS, REQUEST_TIMEOUT_S, offline

pytestmark = pytest.mark.slow  # the embedded 135M model in a server process

AUTH = {"Authorization": f"Bearer {API_KEY}"}
IDS = {"return_token_ids": True}


def metrics(server) -> dict[str, float]:
    """Every sample of /metrics by name (labels joined into the name), through the Prometheus parser."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    h = server.health()
    assert h["status"] == "ok" and h["pages_total"] > 0 and h["pages_used"] == 0


def test_completion_greedy_equals_generate(server, client, lm, greedy):
    # two prompts in one request (choices in prompt order), not streamed
    r = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=MAX_TOKENS, temperature=0, extra_body=IDS)
    assert [c.index for c in r.choices] == [0, 1]
    for c, p in zip(r.choices, PROMPTS[:2]):
        assert c.token_ids == greedy[p]
        assert c.text == lm.tokenizer.decode(greedy[p], skip_special_tokens=True)
        assert c.finish_reason == ("length" if len(greedy[p]) == MAX_TOKENS else "stop")
    assert r.usage.completion_tokens == sum(len(greedy[p]) for p in PROMPTS[:2])
    assert r.usage.prompt_tokens == sum(len(lm.tokenizer(p)["input_ids"]) for p in PROMPTS[:2])
    cfg, dms = lm.config, r.dms
    cached = r.usage.prompt_tokens + r.usage.completion_tokens - 2  # the last token of each is not in the cache
    assert dms["kv_dense_tokens"] == cfg.num_layers * cfg.num_kv_heads * cached
    assert 0 < dms["kv_live_tokens"] <= dms["kv_dense_tokens"]
    assert dms["compression_ratio"] == round(dms["kv_dense_tokens"] / dms["kv_live_tokens"], 4)
    # streamed
    p = PROMPTS[2]
    got, pieces, reason = [], [], None
    for ch in client.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                        extra_body=IDS):
        got += ch.choices[0].token_ids
        pieces.append(ch.choices[0].text)
        reason = ch.choices[0].finish_reason or reason
    assert got == greedy[p]
    assert "".join(pieces) == lm.tokenizer.decode(greedy[p], skip_special_tokens=True)
    assert reason == ("length" if len(got) == MAX_TOKENS else "stop")


def test_chat_greedy_equals_generate_with_usage(server, client, lm, greedy):
    ids = greedy["chat:" + CHAT]
    text = lm.tokenizer.decode(ids, skip_special_tokens=True)
    msgs = [{"role": "user", "content": CHAT}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n_samples_share_the_prompt_pages(server, client, lm):
    server.wait_idle()
    prompt = "Write a short poem about the sea:"
    before = metrics(server)
    r = client.completions.create(model=MODEL, prompt=prompt, n=4, max_tokens=4, temperature=1.0, seed=7,
                                  extra_body={**IDS, "ignore_eos": True})
    after = metrics(server)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and all(len(c.token_ids) == 4 for c in r.choices)
    # the prompt went through the model once: the other samples started from its pages
    computed = after["dms_prefill_tokens_computed_total"] - before["dms_prefill_tokens_computed_total"]
    assert computed == r.usage.prompt_tokens
    assert r.usage.completion_tokens == 16
    # seeded samples equal the offline ones (sample i draws from seed + i), and differ from each other
    want = offline(lm, [prompt], chat=False, n=4, max_new_tokens=4, temperature=1.0, seed=7, ignore_eos=True)
    assert [c.token_ids for c in r.choices] == want
    assert len({tuple(t) for t in want}) > 1
    assert server.wait_idle()["pages_used"] == 0


def test_sixteen_concurrent_streams_equal_offline(server, greedy):
    from openai import AsyncOpenAI

    server.wait_idle()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]

    async def one(c, prompt):
        ids = []
        stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, extra_body=IDS)
        async for ch in stream:
            ids += ch.choices[0].token_ids
        return ids

    async def main():
        async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, timeout=REQUEST_TIMEOUT_S,
                               max_retries=0) as c:
            return await asyncio.wait_for(asyncio.gather(*(one(c, p) for p in prompts)), REQUEST_TIMEOUT_S)

    before = metrics(server)
    got = asyncio.run(main())
    assert got == [greedy[p] for p in prompts]
    h = server.wait_idle()
    assert h["pages_used"] == 0 and h["pages_free"] == h["pages_total"]
    after = metrics(server)
    assert after["dms_kv_pages_used"] == 0
    assert after["dms_generation_tokens_total"] - before["dms_generation_tokens_total"] == sum(map(len, got))
    assert after["dms_preemptions_total"] == before["dms_preemptions_total"]


def test_disconnect_mid_stream_frees_pages_and_spares_the_others(server, client, greedy):
    server.wait_idle()
    before = metrics(server)
    body = {"model": MODEL, "prompt": "Count slowly from one to one hundred:", "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    other = {}

    def bystander():
        r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body=IDS)
        other["ids"] = r.choices[0].token_ids

    t = threading.Thread(target=bystander)
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as h:
        with h.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = 0
            for line in lines:
                got += line.startswith("data: ")
                if got == 1 and t.ident is None:
                    t.start()
                if got == 3:
                    break  # leave mid-stream: the connection closes with this block
    t.join(REQUEST_TIMEOUT_S)
    assert other["ids"] == greedy[PROMPTS[0]]
    assert server.wait_idle()["pages_used"] == 0
    after = metrics(server)
    aborted = "dms_sequences_finished_total{reason=abort}"
    assert after.get(aborted, 0) - before.get(aborted, 0) == 1
    # the abandoned request stopped long before its 200 tokens
    made = after["dms_generation_tokens_total"] - before["dms_generation_tokens_total"] - len(other["ids"])
    assert 3 <= made < 200


def test_metrics_parse_and_move(server, client):
    server.wait_idle()
    before = metrics(server)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=6, temperature=0)
    after = metrics(server)
    assert after["dms_generation_tokens_total"] - before["dms_generation_tokens_total"] == r.usage.completion_tokens
    assert after["dms_prompt_tokens_total"] - before["dms_prompt_tokens_total"] == r.usage.prompt_tokens
    assert after["dms_time_to_first_token_seconds_count"] == before["dms_time_to_first_token_seconds_count"] + 1
    assert (after["dms_inter_token_latency_seconds_count"] - before["dms_inter_token_latency_seconds_count"]
            == r.usage.completion_tokens - 1)
    assert after["dms_request_latency_seconds_count"] == before["dms_request_latency_seconds_count"] + 1
    assert after["dms_engine_steps_total"] > before["dms_engine_steps_total"]
    for name in ("dms_requests_running", "dms_requests_waiting", "dms_kv_pages_used", "dms_kv_pages_free",
                 "dms_kv_live_tokens", "dms_kv_dense_tokens", "dms_preemptions_total"):
        assert name in after
    assert after["dms_kv_pages_free"] + after["dms_kv_pages_used"] == after["dms_kv_pages_total"]


def test_live_gauges_while_running(server):
    """While a request runs, the pool and live/dense gauges show it; afterwards they are back to zero."""
    server.wait_idle()
    body = {"model": MODEL, "prompt": "Tell me a story:", "max_tokens": 100, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as h:
        with h.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH) as resp:
            lines = (line for line in resp.iter_lines() if line)  # held: a dropped iterator closes the connection
            for _ in range(2):
                assert next(lines).startswith("data: ")
            m = metrics(server)
            assert m["dms_requests_running"] == 1 and m["dms_kv_pages_used"] > 0
            assert 0 < m["dms_kv_live_tokens"] <= m["dms_kv_dense_tokens"]
    server.wait_idle()
    m = metrics(server)
    assert m["dms_kv_pages_used"] == 0 and m["dms_kv_live_tokens"] == 0 and m["dms_requests_running"] == 0


def test_full_queue_answers_503_with_retry_after(server, client):
    server.wait_idle()
    capacity = MAX_SEQS + MAX_WAITING
    body = {"model": MODEL, "prompt": "Tell me a long story:", "max_tokens": 200, "temperature": 0, "n": capacity,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as h:
        with h.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH) as resp:
            assert resp.status_code == 200
            lines = (line for line in resp.iter_lines() if line)  # held: a dropped iterator closes the connection
            assert next(lines).startswith("data: ")
            r = h.post(f"{server.url}/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 503
            assert int(r.headers["retry-after"]) >= 1
            err = r.json()["error"]
            assert err["code"] == "queue_full" and "retry" in err["message"] and err["type"] == "server_error"
    assert server.wait_idle()["pages_used"] == 0
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1


def test_stop_string_cuts_the_text_streamed_or_not(server, client, lm, greedy):
    p = PROMPTS[1]
    full = lm.tokenizer.decode(greedy[p], skip_special_tokens=True)
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]  # cut before the third word
    want = full[: full.find(stop)]
    r = client.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    pieces, reason = [], None
    for ch in client.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0, stop=stop,
                                        stream=True):
        pieces.append(ch.choices[0].text)
        reason = ch.choices[0].finish_reason or reason
    assert "".join(pieces) == want and reason == "stop"  # the stop string is never streamed
