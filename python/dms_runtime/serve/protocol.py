"""Request and response shapes of the OpenAI API (the fields we serve), and its error shape.

Bodies are validated strictly from JSON (``"5"`` is not an int, ``true`` is not a number); every
error names the field and the value it expects, in ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_N = 16  # samples per request
MAX_STOP = 4  # stop strings per request (as OpenAI)
MAX_PROMPTS = 16  # prompts in one /v1/completions call


class APIError(Exception):
    """An error answered in the OpenAI shape with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[int]", "list[str]", "list[list[int]]", "TextPart", "list[TextPart]",
                      "function-after[_check_ids(), list[int]]", "function-after[_check_ids(), list[list[int]]]"):
            continue  # union member names pydantic adds to the location
        else:
            out += ("." if out else "") + str(part)
    return out


def validation_error(exc: ValidationError) -> APIError:
    """The first problem of a pydantic error, as a 400 naming the field, the expectation and the value."""
    errs = exc.errors(include_url=False)
    e = errs[0]
    if e["type"] == "json_invalid":
        return APIError(400, f"body: expected a JSON object, could not parse it ({e['msg']})", code="invalid_json")
    if e["type"] in ("model_type", "model_attributes_type") and not e["loc"]:
        return APIError(400, f"body: expected a JSON object, got {type(e['input']).__name__}", code="invalid_json")
    param = _loc(e["loc"]) or None
    msg = e["msg"]
    if e["type"] == "missing":
        return APIError(400, f"{param}: this field is required", param=param, code="missing_required_parameter")
    if e["type"] == "extra_forbidden":
        return APIError(400, f"{param}: unknown field", param=param, code="unknown_parameter")
    got = repr(e.get("input"))
    if len(got) > 80:
        got = got[:77] + "..."
    if e["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    elif e["loc"] and e["loc"][0] in _UNIONS and len(e["loc"]) <= 3:
        param = e["loc"][0]
        msg = "expected " + _UNIONS[param]
    return APIError(400, f"{param}: {msg[0].lower() + msg[1:]}; got {got}", param=param, code="invalid_value")


# fields that take one of several shapes: one message for all of pydantic's per-member errors
_UNIONS = {
    "prompt": f"a non-empty string, a list of 1 to {MAX_PROMPTS} strings, a non-empty list of token ids (ints >= 0) "
              f"or a list of 1 to {MAX_PROMPTS} such lists",
    "stop": f"a non-empty string or a list of at most {MAX_STOP} non-empty strings",
}



class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


def _check_ids(ids: list[int]) -> list[int]:
    if any(t < 0 for t in ids):
        raise ValueError("Token ids should be >= 0")
    return ids


TokenIds = Annotated[list[int], Field(min_length=1)]


class _Sampling(_Strict):
    """The sampling fields both endpoints share. ``top_k``, ``ignore_eos`` and ``return_token_ids``
    are extensions."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False  # extension: the generated token ids in each choice (and stream chunk)
    user: str | None = None
    # accepted only at their neutral values: we do not implement them
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: Any = None
    logit_bias: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        items = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in items):
            raise ValueError("Stop strings should be non-empty")
        return v

    def unsupported(self) -> None:
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if v not in (None, 0, 0.0):
                raise APIError(400, f"{name}: not supported by this server; expected 0 or absent, got {v!r}",
                               param=name, code="unsupported_value")
        if self.logprobs not in (None, False, 0):
            raise APIError(400, f"logprobs: not supported by this server; expected null or false, got {self.logprobs!r}",
                           param="logprobs", code="unsupported_value")
        if self.logit_bias:
            raise APIError(400, "logit_bias: not supported by this server; expected null or {}", param="logit_bias",
                           code="unsupported_value")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options",
                           code="invalid_value")

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], int):
            _check_ids(v)
        elif isinstance(v, list) and v and isinstance(v[0], list):
            for ids in v:
                _check_ids(ids)
        return v

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo:
            raise APIError(400, "echo: not supported by this server; expected false", param="echo",
                           code="unsupported_value")
        if self.best_of not in (None, 1):
            raise APIError(400, f"best_of: not supported by this server; expected 1 or absent, got {self.best_of!r}",
                           param="best_of", code="unsupported_value")
        if self.suffix:
            raise APIError(400, "suffix: not supported by this server; expected null", param="suffix",
                           code="unsupported_value")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]


# ---------------------------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str | None) -> str | None:
    """Engine reasons -> OpenAI's: an EOS or stop token/string is "stop", the length limit "length"."""
    if reason is None:
        return None
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)
