"""A catalogue of bad requests: each gets the right 4xx and an OpenAI-shaped error naming the field and
what it expects; the server still answers correctly afterwards."""

from __future__ import annotations

import httpx
import pytest

from .serve_helpers import API_KEY, MAX_BODY, MAX_MODEL_LEN, MAX_TOKENS, MODEL, PROMPTS

pytestmark = pytest.mark.slow  # the embedded 135M model in a server process

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
C, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
MSG = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def with_(base, **kw):
    out = dict(base)
    for k, v in kw.items():
        if v is DROP:
            out.pop(k)
        else:
            out[k] = v
    return out


DROP = object()

# (name, method, path, body (dict, or raw bytes), headers, status, param the error names (None: any), words in the message)
CASES = [
    ("malformed json", "POST", C, b'{"model": "x", "prompt": ', AUTH, 400, None, ["JSON"]),
    ("body not an object", "POST", C, b"[1, 2]", AUTH, 400, None, ["JSON object"]),
    ("empty body", "POST", C, b"", AUTH, 400, None, ["JSON"]),
    ("missing model", "POST", C, with_(OK, model=DROP), AUTH, 400, "model", ["required"]),
    ("missing prompt", "POST", C, with_(OK, prompt=DROP), AUTH, 400, "prompt", ["required"]),
    ("unknown model", "POST", C, with_(OK, model="gpt-4"), AUTH, 404, "model", [MODEL, "gpt-4"]),
    ("prompt wrong type", "POST", C, with_(OK, prompt=5), AUTH, 400, "prompt", ["string", "token ids"]),
    ("empty prompt", "POST", C, with_(OK, prompt=""), AUTH, 400, "prompt", ["non-empty"]),
    ("empty prompt list", "POST", C, with_(OK, prompt=[]), AUTH, 400, "prompt", ["non-empty"]),
    ("negative token id", "POST", C, with_(OK, prompt=[1, -2]), AUTH, 400, "prompt", [">= 0"]),
    ("token id past the vocabulary", "POST", C, with_(OK, prompt=[1, 10**7]), AUTH, 400, "prompt", ["[0, "]),
    ("over-long prompt", "POST", C, with_(OK, prompt="hello " * (MAX_MODEL_LEN + 50)), AUTH, 400, "prompt",
     ["expected at most"]),
    ("max_tokens string", "POST", C, with_(OK, max_tokens="5"), AUTH, 400, "max_tokens", ["integer", "'5'"]),
    ("max_tokens negative", "POST", C, with_(OK, max_tokens=-1), AUTH, 400, "max_tokens", ["greater than or equal to 1"]),
    ("max_tokens zero", "POST", C, with_(OK, max_tokens=0), AUTH, 400, "max_tokens", ["greater than or equal to 1"]),
    ("max_tokens huge", "POST", C, with_(OK, max_tokens=10**6), AUTH, 400, "max_tokens",
     ["context of 2048 tokens", "expected max_tokens <="]),
    ("request larger than the KV pool", "POST", C, with_(OK, max_tokens=MAX_MODEL_LEN - 100), AUTH, 400, "max_tokens",
     ["KV pool", "expected max_tokens <="]),
    ("max_tokens float", "POST", C, with_(OK, max_tokens=2.5), AUTH, 400, "max_tokens", ["integer"]),
    ("temperature negative", "POST", C, with_(OK, temperature=-0.5), AUTH, 400, "temperature", ["greater than or equal to 0"]),
    ("temperature too high", "POST", C, with_(OK, temperature=3), AUTH, 400, "temperature", ["less than or equal to 2"]),
    ("temperature string", "POST", C, with_(OK, temperature="hot"), AUTH, 400, "temperature", ["number"]),
    ("top_p zero", "POST", C, with_(OK, top_p=0), AUTH, 400, "top_p", ["greater than 0"]),
    ("top_p above one", "POST", C, with_(OK, top_p=1.5), AUTH, 400, "top_p", ["less than or equal to 1"]),
    ("top_k negative", "POST", C, with_(OK, top_k=-3), AUTH, 400, "top_k", ["greater than or equal to 0"]),
    ("stop empty string", "POST", C, with_(OK, stop=""), AUTH, 400, "stop", ["non-empty"]),
    ("stop too many", "POST", C, with_(OK, stop=["a", "b", "c", "d", "e"]), AUTH, 400, "stop", ["at most 4"]),
    ("stop wrong type", "POST", C, with_(OK, stop=7), AUTH, 400, "stop", ["string"]),
    ("n huge", "POST", C, with_(OK, n=1000), AUTH, 400, "n", ["less than or equal to 16"]),
    ("n zero", "POST", C, with_(OK, n=0), AUTH, 400, "n", ["greater than or equal to 1"]),
    ("n bool", "POST", C, with_(OK, n=True), AUTH, 400, "n", ["integer"]),
    ("seed string", "POST", C, with_(OK, seed="x"), AUTH, 400, "seed", ["integer"]),
    ("stream not bool", "POST", C, with_(OK, stream="yes"), AUTH, 400, "stream", ["boolean"]),
    ("stream_options without stream", "POST", C, with_(OK, stream_options={"include_usage": True}), AUTH, 400,
     "stream_options", ["stream"]),
    ("unsupported echo", "POST", C, with_(OK, echo=True), AUTH, 400, "echo", ["not supported"]),
    ("unsupported presence_penalty", "POST", C, with_(OK, presence_penalty=1.0), AUTH, 400, "presence_penalty",
     ["not supported"]),
    ("chat missing messages", "POST", CHAT, with_(MSG, messages=DROP), AUTH, 400, "messages", ["required"]),
    ("chat empty messages", "POST", CHAT, with_(MSG, messages=[]), AUTH, 400, "messages", ["at least 1"]),
    ("chat bad role", "POST", CHAT, with_(MSG, messages=[{"role": "robot", "content": "x"}]), AUTH, 400,
     "messages[0].role", ["'user'", "'robot'"]),
    ("chat content missing", "POST", CHAT, with_(MSG, messages=[{"role": "user"}]), AUTH, 400, "messages[0].content",
     ["required"]),
    ("chat max_tokens huge", "POST", CHAT, with_(MSG, max_tokens=10**6), AUTH, 400, "max_tokens",
     ["expected max_tokens <="]),
    ("no api key", "POST", C, OK, {"Content-Type": "application/json"}, 401, None, ["Bearer"]),
    ("wrong api key", "POST", C, OK, {"Authorization": "Bearer nope"}, 401, None, ["wrong API key"]),
    ("models without key", "GET", "/v1/models", None, {}, 401, None, ["Bearer"]),
    ("oversized body", "POST", C, with_(OK, prompt="x" * (MAX_BODY + 10)), AUTH, 413, None, ["at most"]),
    ("unknown route", "POST", "/v1/embeddings", OK, AUTH, 404, None, ["/v1/embeddings", "does not exist"]),
    ("wrong method", "GET", C, None, AUTH, 405, None, ["GET"]),
]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as h:
        yield h


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request(http, case):
    name, method, path, body, headers, status, param, words = case
    content = body if isinstance(body, bytes) else None
    r = http.request(method, path, content=content, json=None if content is not None or body is None else body,
                     headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and isinstance(err["type"], str)
    if param is not None:
        assert err["param"] == param
        assert err["message"].startswith(param + ":"), err["message"]  # the message names the field
    for w in words:
        assert w in err["message"], err["message"]
    if status == 401:
        assert err["type"] == "authentication_error"


def test_catalogue_is_large_enough():
    assert len(CASES) >= 25


def test_still_serves_correctly_after_bad_requests(server, http, greedy):
    r = http.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS,
                                                          "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200
    assert r.json()["choices"][0]["token_ids"] == greedy[PROMPTS[1]]
    h = server.wait_idle()
    assert h["pages_used"] == 0 and h["in_flight"] == 0
