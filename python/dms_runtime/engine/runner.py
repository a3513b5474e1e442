"""The model runner: between the engine (requests, outputs) and the model.

For a scheduled batch it builds the inputs and the step plan (the step's pages reserved once,
for every layer), runs the model over the paged cache with the kernel set chosen at engine
construction, closes the step (one host sync), and samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.decoder import DecoderLM
from ..paged.backends import OPS, PagedKernels
from ..paged.cache import PagedKVCache
from ..paged.plan import StepPlan
from ..paged.step import PagedStep
from ..sampling import Sampler
from .request import Request


@dataclass(slots=True)
class StepResult:
    logits: torch.Tensor  # [B, V] float32, the last new position of each row
    finite: list[bool]  # per row: all logits finite
    kv_bytes_read: int  # K/V bytes attention read from the cache in this step


class ModelRunner:
    """Runs one engine step of ``model`` over ``cache`` with ``kernels``; ``ran`` collects, per
    op (projection, prefill, decode, store), the implementations that ran it."""

    def __init__(self, model: DecoderLM, cache: PagedKVCache, kernels: PagedKernels):
        self.model, self.cache, self.kernels = model, cache, kernels
        self.ran: dict[str, set[str]] = {}

    def run(self, reqs: list[Request], chunks: list[int]) -> StepResult:
        """Process ``chunks[i]`` new tokens of ``reqs[i]``. The caller advances the requests; on an
        exception the cache may hold part of the step (the caller frees those sequences)."""
        dev = self.model.device
        starts = [r.num_computed for r in reqs]
        plan = StepPlan.build(self.cache, [r.slot for r in reqs], starts, chunks)
        ids = torch.zeros((len(reqs), plan.t), dtype=torch.int64)
        for i, (r, n) in enumerate(zip(reqs, chunks)):
            ids[i, :n] = torch.tensor(r.tokens[r.num_computed : r.num_computed + n])
        positions = plan.starts[:, None] + torch.arange(plan.t, device=dev)[None, :]
        for op, impl in self.kernels.ran(self.model.config, plan, self.model.dtype).items():
            self.ran.setdefault(op, set()).add(impl)
        step = PagedStep(self.cache, plan, self.kernels)
        logits = self.model(ids.to(dev), positions, step, logits_index=plan.n_new - 1)[:, 0].float()
        finite = torch.isfinite(logits).all(-1).tolist()
        read = self.cache.finish_step(plan)
        return StepResult(logits, finite, read * self.cache.token_bytes)

    def report(self) -> dict[str, str]:
        """op -> what ran it ("+"-joined when a run used several), in the order of ``OPS``."""
        return {op: "+".join(sorted(self.ran[op])) for op in OPS if op in self.ran}

    @staticmethod
    def sample(req: Request, logits_row: torch.Tensor) -> int:
        return Sampler.draw(req.params, logits_row, req.generator)
