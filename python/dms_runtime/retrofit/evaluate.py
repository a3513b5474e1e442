"""Fidelity of a DMS model to its vanilla self, and the compression it achieves.

Teacher-forced on held-out text of a given length: KL(dms || vanilla) per token, greedy
next-token agreement, and live tokens / total per (layer, KV head) at the end (the minimum a
cache must hold, semantics §3). Passkey retrieval accuracy through generate().

:func:`compare_methods` puts vanilla, DMS and the heuristic policies of :mod:`.policies` side by
side at the KV budget DMS reached (its peak tokens held), on the same held-out texts, with needle
accuracy scored teacher-forced (every answer token must be the greedy prediction) for all of them.

:func:`retrieval_suite` scores the calibrated retrieval tasks of :mod:`.retrieval` by greedy generation:
vanilla and DMS through the paged runtime (``dms_runtime.generate``), the policies through
:func:`.policies.policy_generate` at DMS's budget; vanilla first, and only the (task, length) points
where vanilla is informative are run for the others.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch

from dms_kernels import reference as ref

from ..models.full_sequence import FullSequenceAttention
from .training_backend import eviction_off
from .data import pack, passkey_task, stdlib_documents, variable_tracking_task
from .losses import token_kl
from .retrieval import CALIBRATION


@dataclass(slots=True)
class FidelityRow:
    length: int
    sequences: int
    kl_per_token: float
    greedy_agreement: float
    live_fraction: float  # live tokens / total at the end, over layers, heads and sequences
    compression_ratio: float
    live_fraction_per_layer: list[float]
    peak_live_fraction: float  # the most tokens held at any point / a dense cache's final size
    read_fraction: float  # K/V tokens read by all queries / what dense attention reads
    passkey_accuracy_dms: float | None = None
    passkey_accuracy_vanilla: float | None = None
    vartrack_accuracy_dms: float | None = None
    vartrack_accuracy_vanilla: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def heldout_sequences(lm, length: int, sequences: int, seed: int = 1234) -> list[list[int]]:
    """``sequences`` token sequences of ``length`` from the held-out standard-library files."""
    if length < 2 or sequences < 1:
        raise ValueError(f"length/sequences: expected >= 2 and >= 1, got {length} and {sequences}")
    seqs = []
    for s in pack(stdlib_documents(seed=seed, split="heldout"), lm.tokenizer, length):
        seqs.append(s)
        if len(seqs) == sequences:
            return seqs
    raise ValueError(f"length: the held-out text holds fewer than {sequences} sequences of {length} tokens")


def heldout_sources(lm, length: int, sequences: int, seed: int = 1234) -> list[str]:
    """For each of :func:`heldout_sequences`' texts (same arguments): the standard-library file that holds
    most of its tokens (a long file fills several texts in a row, and those texts are alike)."""
    if length < 2 or sequences < 1:
        raise ValueError(f"length/sequences: expected >= 2 and >= 1, got {length} and {sequences}")
    out, held, filled = [], {}, 0
    for name, doc in stdlib_documents(seed=seed, split="heldout", names=True):
        left = len(lm.tokenizer(doc, add_special_tokens=False)["input_ids"])
        while left:
            take = min(left, length - filled)
            held[name] = held.get(name, 0) + take
            filled, left = filled + take, left - take
            if filled == length:
                out.append(max(held, key=held.get))  # the first file among equals
                held, filled = {}, 0
                if len(out) == sequences:
                    return out
    raise ValueError(f"length: the held-out text holds fewer than {sequences} sequences of {length} tokens")


def token_scores(logits: torch.Tensor, vanilla: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of one text (``[1, T, V]`` logits each): KL(model || vanilla) and 1.0 where the
    greedy tokens agree, each ``[T]``."""
    return token_kl(logits, vanilla)[0], (logits.argmax(-1) == vanilla.argmax(-1))[0].float()


# positions per bootstrap block: errors cluster over hundreds of tokens (bench/paired_gaps.py on 16 texts
# at 2K: 128-token blocks give an interval 0.7x as wide as resampling whole texts, 512-token ones about 1.1x)
GAP_BLOCK = 512
GAP_RESAMPLES = 2000
GAP_MIN_BLOCKS = 8


def paired_gap(base: list[torch.Tensor], other: list[torch.Tensor], block: int = GAP_BLOCK,
               resamples: int = GAP_RESAMPLES, seed: int = 0, min_blocks: int = GAP_MIN_BLOCKS) -> list[float]:
    """``[gap, low, high]``: the mean over every position of every text of ``other - base`` (per-position
    scores of two methods on the same texts), and its 95% interval from a bootstrap that resamples
    blocks of ``block`` consecutive positions (within a text) with replacement, ``resamples`` times;
    blocks are made shorter where the texts hold fewer than ``min_blocks`` of them."""
    if len(base) != len(other) or not base:
        raise ValueError(f"other: expected one score tensor per text of base ({len(base)}), got {len(other)}")
    if block < 1 or resamples < 1:
        raise ValueError(f"block/resamples: expected >= 1, got {block} and {resamples}")
    block = max(1, min(block, sum(a.numel() for a in base) // max(1, min_blocks)))
    sums, counts = [], []
    for a, b in zip(base, other):
        if a.shape != b.shape or a.dim() != 1:
            raise ValueError(f"other: expected a [T] tensor of base's shape {tuple(a.shape)}, got {tuple(b.shape)}")
        for chunk in (b.double() - a.double()).split(block):
            sums.append(chunk.sum())
            counts.append(chunk.numel())
    sums, counts = torch.stack(sums), torch.tensor(counts, dtype=torch.float64)
    pick = torch.randint(len(sums), (resamples, len(sums)), generator=torch.Generator().manual_seed(seed))
    boot = sums[pick].sum(1) / counts[pick].sum(1)
    low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [float(sums.sum() / counts.sum()), low, high]


def forward_ids(model, ids: list[int], backend) -> torch.Tensor:
    """One teacher-forced pass of token ids ``ids`` (positions from 0) through ``model`` with the
    attention ``backend``: the logits ``[1, T, V]``."""
    t = torch.tensor([ids], device=model.device)
    return model(t, torch.arange(len(ids), device=model.device)[None], backend)


@torch.inference_mode()
def vanilla_logits(lm, seqs: list[list[int]]) -> list[torch.Tensor]:
    with eviction_off(lm.model):
        return [forward_ids(lm.model, s, FullSequenceAttention()) for s in seqs]


@torch.inference_mode()
def fidelity(lm, length: int, sequences: int = 2, seed: int = 1234, vanilla: list[torch.Tensor] | None = None,
             scores: list | None = None, texts: list[list[int]] | None = None) -> FidelityRow:
    """Compare the model with eviction on and off on ``sequences`` stdlib texts of ``length`` tokens
    (``vanilla``: the eviction-off logits of :func:`heldout_sequences`, when already computed; ``scores``:
    a list that receives each text's per-position :func:`token_scores`; ``texts``: score these token
    sequences of ``length`` instead of the first ``sequences`` held-out ones)."""
    model, cfg = lm.model, lm.config
    if not cfg.dms_active:
        raise ValueError("model: fidelity needs a DMS model with eviction on")
    if texts is not None and any(len(t) != length for t in texts):
        raise ValueError(f"texts: expected token sequences of length={length}, got {[len(t) for t in texts]}")
    seqs = texts if texts is not None else heldout_sequences(lm, length, sequences, seed)
    vanilla = vanilla if vanilla is not None else vanilla_logits(lm, seqs)
    kls, agree, live, total = [], [], torch.zeros(cfg.num_layers, dtype=torch.float64), 0
    peak, reads, dense_reads = 0.0, 0.0, 0.0
    w = cfg.dms.window_size
    for s, van in zip(seqs, vanilla):
        backend = FullSequenceAttention(cfg.dms.window_size, record=True)
        kl, hit = token_scores(forward_ids(model, s, backend), van)
        kls.append(kl.mean().item())
        agree.append(hit.mean().item())
        if scores is not None:
            scores.append((kl, hit))
        held_over_time = 0
        for layer in range(cfg.num_layers):
            d = backend.decisions[layer]  # [1, H, T]
            live[layer] += ref.live_tokens(d, w, length - 1).sum().item()
            # held after position t: min(t + 1, w) + kept tokens older than the window
            keep_old = torch.cumsum((~d).long(), -1)  # kept among 0..t
            t = torch.arange(length)
            older = torch.where(t - w >= 0, keep_old[..., (t - w).clamp(min=0)], torch.zeros_like(keep_old))
            held_over_time = held_over_time + (torch.clamp(t + 1, max=w) + older).sum(1)  # [1, T] summed over heads
            reads += ref.visibility_mask(d, w).sum().item()
        peak = max(peak, float(held_over_time.max()) / (length * cfg.num_kv_heads * cfg.num_layers))
        dense_reads += cfg.num_layers * cfg.num_kv_heads * length * (length + 1) / 2
        total += length * cfg.num_kv_heads
    per_layer = (live / max(total, 1)).tolist()
    frac = float(live.sum() / max(total * cfg.num_layers, 1))
    return FidelityRow(length, len(seqs), sum(kls) / len(kls), sum(agree) / len(agree), frac,
                       1.0 / frac if frac else float("inf"), per_layer, peak, reads / max(dense_reads, 1))


def passkey_accuracy(lm, length: int, trials: int = 4, seed: int = 99) -> tuple[float, float]:
    """Greedy retrieval of a 5-digit pass key hidden in ~``length`` tokens: (DMS, vanilla) accuracy."""
    return task_accuracy(lm, length, lambda n, rng: passkey_task(n, rng), trials, seed)


def vartrack_accuracy(lm, length: int, trials: int = 4, seed: int = 77, hops: int = 3) -> tuple[float, float]:
    """Variable tracking over ``hops`` chained assignments in ~``length`` tokens: (DMS, vanilla) accuracy."""
    return task_accuracy(lm, length, lambda n, rng: variable_tracking_task(n, hops, rng), trials, seed)


def task_prompts(lm, length: int, make_task, trials: int, seed: int) -> tuple[list[list[int]], list[str]]:
    """``trials`` task prompts of at most ``length`` tokens and their answers."""
    rng = random.Random(seed)
    prompts, keys = [], []
    for _ in range(trials):
        n = max(8, length // 2)
        while True:
            text, answer = make_task(n, rng)
            ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= length or n <= 8:
                break
            n = int(n * 0.8)
        prompts.append(ids[-length:])
        keys.append(answer)
    return prompts, keys


def task_accuracy(lm, length: int, make_task, trials: int, seed: int) -> tuple[float, float]:
    """Greedy answers to synthetic tasks of about ``length`` tokens, with eviction on and off."""
    from ..api import generate

    prompts, keys = task_prompts(lm, length, make_task, trials, seed)
    keys = [k.strip() for k in keys]
    scores = []
    for off in (False, True):
        if off:
            with eviction_off(lm.model):
                res = generate(lm, prompts, max_new_tokens=8, ignore_eos=True)
        else:
            res = generate(lm, prompts, max_new_tokens=8, ignore_eos=True)
        scores.append(sum(k in (t or "") for k, t in zip(keys, res.texts)) / trials)
    return scores[0], scores[1]


# ---------------------------------------------------------------------------- methods side by side


@dataclass(slots=True)
class MethodRow:
    """One method at one length: quality and the two KV budgets (fractions of a dense cache)."""

    method: str  # "vanilla", "dms" or a policy name
    model: str
    length: int
    budget: int | None  # KV tokens per (layer, KV head) given to a policy; None for vanilla / DMS
    kl_per_token: float
    greedy_agreement: float
    held_fraction: float  # the most KV tokens held at any step / a dense cache at the end
    read_fraction: float | None  # K/V tokens read by all queries / dense (None: not recorded)
    passkey_accuracy: float | None = None  # teacher-forced exact answers
    retrieval_accuracy: float | None = None  # greedy generation, mean over the tasks where vanilla is informative
    # a policy's [gap, low, high] to DMS on the same positions (policy - DMS, 95% interval; paired_gap)
    kl_gap: list[float] | None = None
    agreement_gap: list[float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def forced_accuracy(model, tasks: list[tuple[list[int], list[int]]], make_backend=None, forward=None) -> float:
    """Fraction of tasks whose every answer token is the greedy prediction, teacher-forced through a
    fresh ``make_backend()`` per task, or ``forward(ids)`` (the logits ``[1, T, V]``) where given."""
    right = 0
    for prompt, answer in tasks:
        ids = prompt + answer
        logits = forward(ids) if forward is not None else forward_ids(model, ids, make_backend())
        pred = logits[0, len(prompt) - 1: len(prompt) + len(answer) - 1].argmax(-1).tolist()
        right += pred == answer
    return right / max(len(tasks), 1)


MATCHES = ("held", "read")


def matched_budget(policy: str, match: str, dms_row: FidelityRow, length: int) -> int:
    """A policy's KV tokens per layer and head at DMS's memory: its peak tokens held (``match="held"``)
    or its K/V tokens read by all queries (``"read"``, the bytes decoding moves)."""
    from .policies import policy_budget, read_budget

    if match == "held":
        return policy_budget(dms_row.peak_live_fraction, length)
    if match == "read":
        return read_budget(policy, dms_row.read_fraction, length)
    raise ValueError(f"match: expected one of {MATCHES}, got {match!r}")


def matched_fraction(policy: str, match: str, dms_row: FidelityRow, length: int) -> float:
    """:func:`matched_budget` as a fraction of ``length``, for prompts of other lengths (retrieval cases):
    DMS's peak held fraction itself for ``"held"``."""
    if match == "held":
        return dms_row.peak_live_fraction
    return matched_budget(policy, match, dms_row, length) / length


DEFERRED = "dms-deferred"  # the method name of DMS with its evictions deferred (retrofit.deferred)


def compare_methods(lm, length: int, sequences: int = 1, policies=(), passkey_trials: int = 0,
                    label: str = "dms", seed: int = 1234, vanilla: list[torch.Tensor] | None = None,
                    match: str = "held", defer: bool = False) -> tuple[FidelityRow, list[MethodRow]]:
    """Vanilla, DMS, and each policy at DMS's budget: its peak KV tokens held per layer and head
    (``match="held"``) or its KV tokens read (``"read"``, :func:`matched_budget`); also DMS's
    :class:`FidelityRow` on the same texts (``vanilla``: their eviction-off logits, when known). Each
    policy's row carries its :func:`paired_gap` to DMS on KL and on agreement. ``defer``: also DMS with
    its evictions deferred until a pool of the held-matched budget per list fills (row ``"dms-deferred"``,
    :mod:`.deferred`; it holds what the policies hold whatever ``match`` is), with its gap to DMS."""
    from .deferred import deferred_forward
    from .policies import PolicyAttention, policy_budget

    if match not in MATCHES:
        raise ValueError(f"match: expected one of {MATCHES}, got {match!r}")
    if not isinstance(defer, bool):
        raise ValueError(f"defer: expected a bool, got {defer!r}")
    model, cfg = lm.model, lm.config
    seqs = heldout_sequences(lm, length, sequences, seed)
    vanilla = vanilla if vanilla is not None else vanilla_logits(lm, seqs)
    dms_scores = []
    dms_row = fidelity(lm, length, sequences, seed, vanilla=vanilla, scores=dms_scores)
    tasks = []
    if passkey_trials:
        prompts, answers = task_prompts(lm, length, lambda n, rng: passkey_task(n, rng), passkey_trials, 99)
        tasks = [(p, lm.tokenizer(a, add_special_tokens=False)["input_ids"]) for p, a in zip(prompts, answers)]

    def accuracy(make_backend, evict: bool):
        if not tasks:
            return None
        if evict:
            return forced_accuracy(model, tasks, make_backend)
        with eviction_off(model):
            return forced_accuracy(model, tasks, make_backend)

    rows = [MethodRow("vanilla", label, length, None, 0.0, 1.0, 1.0, 1.0,
                      accuracy(FullSequenceAttention, evict=False)),
            MethodRow("dms", label, length, None, dms_row.kl_per_token, dms_row.greedy_agreement,
                      dms_row.peak_live_fraction, dms_row.read_fraction,
                      accuracy(lambda: FullSequenceAttention(cfg.dms.window_size), evict=True))]
    dense_held = length * cfg.num_kv_heads * cfg.num_layers
    dense_reads = cfg.num_layers * cfg.num_kv_heads * length * (length + 1) / 2
    lists, w = cfg.num_layers * cfg.num_kv_heads, cfg.dms.window_size

    def scored(method: str, budget: int, forward, passkey: float | None) -> MethodRow:
        """``method``'s row over the texts, ``forward(ids)`` giving its logits and backend on each."""
        scores, held, reads = [], 0.0, 0.0
        for s, van in zip(seqs, vanilla):
            logits, backend = forward(s)
            scores.append(token_scores(logits, van))
            held = max(held, backend.held_peak / dense_held)
            reads += backend.reads / dense_reads / len(seqs)
        return MethodRow(method, label, length, budget, sum(kl.mean().item() for kl, _ in scores) / len(scores),
                         sum(hit.mean().item() for _, hit in scores) / len(scores), held, reads, passkey,
                         kl_gap=paired_gap([kl for kl, _ in dms_scores], [kl for kl, _ in scores]),
                         agreement_gap=paired_gap([h for _, h in dms_scores], [h for _, h in scores]))

    if defer:
        budget = policy_budget(dms_row.peak_live_fraction, length)
        right = None
        if tasks:  # teacher-forced, each task's pool the same fraction of its own length
            right = forced_accuracy(model, tasks, forward=lambda ids: deferred_forward(
                model, ids, w, policy_budget(dms_row.peak_live_fraction, len(ids)) * lists)[0])
        rows.append(scored(DEFERRED, budget, lambda s: deferred_forward(model, s, w, budget * lists), right))

    def policy_forward(policy: str, budget: int):
        def forward(s):
            backend = PolicyAttention(policy, budget)
            return forward_ids(model, s, backend), backend
        return forward

    for policy in policies:
        budget = matched_budget(policy, match, dms_row, length)
        passkey = accuracy(lambda: PolicyAttention(policy, budget), evict=False)
        with torch.inference_mode(), eviction_off(model):
            rows.append(scored(policy, budget, policy_forward(policy, budget), passkey))
    return dms_row, rows


# ---------------------------------------------------------------------------- retrieval by generation


@dataclass(slots=True)
class RetrievalRow:
    """One method on one retrieval task at one length, scored by greedy generation."""

    method: str  # "vanilla", "dms" or a policy name
    model: str
    task: str
    length: int
    cases: int
    accuracy: float | None  # None: not run (vanilla is not informative there)
    vanilla_accuracy: float
    informative: bool  # vanilla_accuracy >= the calibration threshold
    budget_fraction: float | None = None  # a policy's KV tokens per layer and head / the prompt length
    held_fraction: float | None = None  # KV tokens held / dense: a policy's peak (mean over the cases); DMS's
    # at the end of generation (all cases together)

    def to_dict(self) -> dict:
        return asdict(self)


class RetrievalSuite:
    """The seeded cases of each (task, length), and vanilla's accuracy on them, measured once per
    base model and shared by the DMS models and policies compared on it."""

    def __init__(self, tasks, cases: int = 20, seed: int = 0, threshold: float = CALIBRATION):
        from .retrieval import TASKS

        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise ValueError(f"tasks: expected some of {TASKS}, got {list(tasks)!r}")
        if cases < 1:
            raise ValueError(f"cases: expected >= 1 per (task, length), got {cases}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold: expected a fraction in [0, 1], got {threshold!r}")
        self.tasks, self.n, self.seed, self.threshold = list(tasks), cases, seed, threshold
        self._cases: dict = {}
        self.vanilla: dict = {}  # (base, task, length) -> accuracy

    def cases(self, tokenizer, base: str, task: str, length: int, context: int | None = None):
        """The cases of (task, length) for models on ``base`` (built once, with its tokenizer; prompts
        leave room for the answer within ``context``, the model's context)."""
        from .retrieval import make_cases

        key = (base, task, length)
        if key not in self._cases:
            self._cases[key] = make_cases(tokenizer, task, length, self.n, self.seed, context=context)
        return self._cases[key]

    def run(self, lm, length: int, label: str, base: str, policies=(),
            budget_fraction: float | dict[str, float] | None = None, dms: bool = True,
            defer_fraction: float | None = None) -> list[RetrievalRow]:
        """Vanilla (once per base, eviction off), then DMS (``dms``), DMS with its evictions deferred
        until ``defer_fraction`` of the prompt per list fills (``defer_fraction``; row ``"dms-deferred"``,
        ``PagedConfig.defer_budget``) and each policy at ``budget_fraction`` of the prompt (one for all,
        or one per policy), on the tasks where vanilla is informative at ``length``."""
        from .retrieval import accuracy, generate_answers, policy_answers

        if lm.tokenizer is None:
            raise ValueError(f"model: {label!r} has no tokenizer; the retrieval tasks need one")
        if policies and budget_fraction is None:
            raise ValueError("budget_fraction: the policies need DMS's budget")
        fractions = (budget_fraction if isinstance(budget_fraction, dict)
                     else {policy: budget_fraction for policy in policies})
        if missing := [p for p in policies if p not in fractions]:
            raise ValueError(f"budget_fraction: expected a fraction for each policy, missing {missing}")
        if defer_fraction is not None and not 0.0 < defer_fraction <= 1.0:
            raise ValueError(f"defer_fraction: expected a fraction in (0, 1], got {defer_fraction!r}")
        rows = []
        for task in self.tasks:
            cases = self.cases(lm.tokenizer, base, task, length, lm.config.max_position_embeddings)
            vkey = (base, task, length)
            first = vkey not in self.vanilla
            if first:
                self.vanilla[vkey] = accuracy(cases, generate_answers(lm, cases, evict=False)[0])
            van = self.vanilla[vkey]
            ok = van >= self.threshold
            if first:
                rows.append(RetrievalRow("vanilla", label, task, length, len(cases), van, van, ok, 1.0, 1.0))
            if dms:
                acc = held = None
                if ok:
                    texts, held = generate_answers(lm, cases, evict=True)
                    acc = accuracy(cases, texts)
                rows.append(RetrievalRow("dms", label, task, length, len(cases), acc, van, ok, None, held))
            if defer_fraction is not None:
                acc = held = None
                if ok:
                    texts, held = generate_answers(lm, cases, evict=True, defer_fraction=defer_fraction)
                    acc = accuracy(cases, texts)
                rows.append(RetrievalRow(DEFERRED, label, task, length, len(cases), acc, van, ok, defer_fraction,
                                         held))
            for policy in policies:
                acc = held = None
                if ok:
                    texts, helds = policy_answers(lm, cases, policy, fractions[policy])
                    acc, held = accuracy(cases, texts), sum(helds) / len(helds)
                rows.append(RetrievalRow(policy, label, task, length, len(cases), acc, van, ok, fractions[policy],
                                         held))
        return rows


def mean_informative(rows: list[RetrievalRow], method: str, model: str, length: int) -> float | None:
    """A method's mean accuracy over the tasks where vanilla is informative at ``length``."""
    accs = [r.accuracy for r in rows if r.method == method and r.length == length and r.informative
            and r.accuracy is not None and (r.model == model or method == "vanilla")]
    return sum(accs) / len(accs) if accs else None
