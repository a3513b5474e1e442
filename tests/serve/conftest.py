"""Fixtures of the serve tests: one ``dms serve`` process for the whole folder (started once,
waited on ``/health`` with a deadline, stopped at teardown), the model in this process, and its
offline answers."""

from __future__ import annotations

import pytest

from .serve_helpers import API_KEY, CHAT, MAX_TOKENS, MODEL, PROMPTS, REQUEST_TIMEOUT_S, ServerProcess, dr_encode, offline


@pytest.fixture(scope="package")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("serve") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="package")
def lm():
    import dms_runtime as dr

    return dr.load(MODEL)


@pytest.fixture()
def client(server):
    from openai import OpenAI

    with OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, timeout=REQUEST_TIMEOUT_S, max_retries=0) as c:
        yield c


@pytest.fixture(scope="package")
def greedy(lm) -> dict[str, list[int]]:
    """Offline greedy answers (MAX_TOKENS) to PROMPTS as completions and to CHAT through the chat
    template, from one dms_runtime.generate() call on token ids."""
    tok = lm.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": CHAT}], add_generation_prompt=True, tokenize=False)
    ids = [tok(p)["input_ids"] for p in PROMPTS] + [tok(chat, add_special_tokens=False)["input_ids"]]
    # the same ids generate() makes from the strings themselves
    assert ids[0] == dr_encode(lm, PROMPTS[0], False) and ids[-1] == dr_encode(lm, CHAT, True)
    out = offline(lm, ids, chat=False, max_new_tokens=MAX_TOKENS, temperature=0)
    return dict(zip(PROMPTS + ["chat:" + CHAT], out))
