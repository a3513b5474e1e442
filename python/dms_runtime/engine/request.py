"""Per-request state of the serving engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..outputs import StopChecker
from ..sampling import SamplingParams

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(slots=True, eq=False)
class Request:
    """A sequence: its tokens (prompt + generated), how many are in the cache, and where.

    ``num_computed`` tokens have their K/V in the cache; the rest (``tokens[num_computed:]``) go
    through the model next: the whole prompt (in chunks) at first, then one sampled token per
    step. A preempted request drops its cache and recomputes ``prompt + generated`` later.
    """

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    stops: StopChecker
    generator: torch.Generator | None
    arrival: int
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    slot: int | None = None
    status: str = WAITING
    finish_reason: str | None = None
    pending_forks: list["Request"] = field(default_factory=list)  # samples 2..n, made after prefill
    live_tokens: list[list[int]] | None = None
    preemptions: int = 0

    def __post_init__(self):
        if not self.tokens:
            self.tokens = list(self.prompt_ids)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt_ids) :]

    @property
    def remaining(self) -> int:
        """Tokens still to go through the model before the next sample."""
        return len(self.tokens) - self.num_computed

    @property
    def prefilling(self) -> bool:
        """More than one token to process: a (chunked) prefill, or a recompute after preemption."""
        return self.remaining > 1
