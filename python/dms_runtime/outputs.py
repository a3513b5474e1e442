"""What a finished request returns, and the rules that finish it (shared by both runtimes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import SamplingParams


@dataclass(slots=True)
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens (an EOS or stop token that ended it included)
    text: str | None
    finish_reason: str  # "eos" | "stop" | "length" | "abort" | "error"
    live_tokens: list[list[int]]  # [L][Hkv] tokens the cache held for it at the end
    error: Exception | None = None  # what ended it, when finish_reason is "error"


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
            # only the tail can hold a stop string that this token completed
            tail = max(32, 4 * max(len(s) for s in self.params.stop))
            text = self.tokenizer.decode(generated[-tail:], skip_special_tokens=True)
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


def non_finite_error(step: int, names: list[int], what: str = "prompts") -> FloatingPointError:
    return FloatingPointError(
        f"logits: non-finite values at generation step {step} for {what} {names} "
        "(check the weights and the dtype; bf16/fp16 overflow is a common cause)"
    )


def check_finite(logits: torch.Tensor, step: int, rows: list[int] | None = None) -> None:
    bad = ~torch.isfinite(logits).all(dim=-1)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        raise non_finite_error(step, [rows[i] for i in idx] if rows is not None else idx)
