"""Sampling parameters and the token sampler (greedy, temperature, top-k, top-p, seeded)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import validation as V


@dataclass(slots=True)
class SamplingParams:
    """How to pick and when to stop.

    temperature 0 means greedy. top_k 0 and top_p 1.0 disable those filters. ``seed`` makes
    sampling reproducible: request ``i`` of a call draws from its own generator seeded ``seed + i``.
    Generation stops at an EOS token (unless ``ignore_eos``), a token of ``stop_token_ids``,
    a string of ``stop`` (the text is cut before it), or after ``max_new_tokens``.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Types, finiteness and ranges; run at creation and again by ``generate()`` and
        ``Engine.add_request`` (a field changed after creation is checked before it is used)."""
        self.max_new_tokens = V.integer("max_new_tokens", self.max_new_tokens, 1, V.MAX_TOKENS)
        self.temperature = V.number("temperature", self.temperature, 0)
        self.top_k = V.integer("top_k", self.top_k, 0, V.MAX_TOKENS)
        self.top_p = V.number("top_p", self.top_p, 0, 1, lo_open=True)
        self.seed = V.seed("seed", self.seed)
        self.stop = V.strings("stop", self.stop)
        if isinstance(self.stop_token_ids, (set, frozenset)):
            self.stop_token_ids = list(self.stop_token_ids)
        self.stop_token_ids = V.token_ids("stop_token_ids", self.stop_token_ids, empty_ok=True)
        V.boolean("ignore_eos", self.ignore_eos)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Draws one token per request from float logits ``[V]``; one generator per request."""

    def __init__(self, params: SamplingParams, num_requests: int):
        self.params = params
        self.generators: list[torch.Generator | None] = []
        for i in range(num_requests):
            if params.greedy:
                self.generators.append(None)
            else:
                g = torch.Generator(device="cpu")
                if params.seed is None:
                    g.seed()
                else:
                    g.manual_seed(params.seed + i)
                self.generators.append(g)

    def __call__(self, request: int, logits: torch.Tensor) -> int:
        return self.draw(self.params, logits, self.generators[request])

    @staticmethod
    def draw(p: SamplingParams, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        """One token from float logits ``[V]``."""
        x = logits.detach().float().cpu()
        if p.greedy:
            return int(torch.argmax(x))
        x = x / p.temperature
        if p.top_k and p.top_k < x.numel():
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
            drop = before >= p.top_p
            drop[0] = False
            x = x.clone()
            x[order[drop]] = float("-inf")
        probs = torch.softmax(x, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))
