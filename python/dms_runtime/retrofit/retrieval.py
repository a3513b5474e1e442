"""Retrieval tasks scored by greedy generation, calibrated on the vanilla model.

The cases follow the long-context literature's formats: the task stated first, a repetitive
haystack ("The grass is green. The sky is blue. ..."), needle sentences at seeded depths, and the
question at the end, restated after the haystack ("Now, what is the pass key? Answer with the number
only.") and ending where the answer starts (a plain prompt: no chat template). The restated question
is what makes the small instruct models answer past 1K: SmolLM2-135M-Instruct given only "What is
the pass key? The pass key is" after 2K tokens of filler continues with prose ("the pass key that
is used to ...") even when the needle is right before the question.

* ``passkey``: one 5-digit pass key (the format of Mohtashami & Jaggi's passkey test).
* ``multikey``: several "special magic number for <key>" needles, RULER NIAH style; the question
  names one key, the others are distractors.
* ``multivalue``: several numbers for the asked key (all must be recalled; partial credit) plus
  distractor keys.
* ``vartrack``: a chain of ``hops`` variable assignments (``VAR A = 12345``, ``VAR B = VAR A``, ...)
  and a distractor chain; the question asks for the value of the chain's last variable.

Cases are token-id prompts built piece by piece (each piece tokenized on its own), so a case's
length and its needles' token positions are exact; the haystack is cut at sentence boundaries, so
the prompt is at most ``length`` tokens and shorter by less than one filler sentence.

Scoring (:func:`score`): the numbers of the generated text in order; a single-answer task is right
when the first number is the answer; ``multivalue`` earns the fraction of expected values among
the first ``len(answers)`` distinct numbers (listing more numbers earns nothing).

Calibration (:func:`informative`): a (task, length) on which vanilla scores below the threshold
(80%) says nothing about a compression method there and is kept out of the comparison.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

TASKS = ("passkey", "multikey", "multivalue", "vartrack")
SINGLE_ANSWER = ("passkey", "multikey", "vartrack")

HAYSTACK = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")

_INTRO = {
    "passkey": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.\n\n",
    "multikey": "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the numbers afterwards.\n\n",
    "multivalue": "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                  "I will quiz you about the numbers afterwards.\n\n",
    "vartrack": "Memorize and track the chain of variable assignments hidden in the following text.\n\n",
}
_KEY_WORDS = ("amber", "bright", "calm", "daring", "eager", "fancy", "gentle", "hollow", "icy", "jolly", "kind",
              "lively", "mellow", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy")
_KEY_NOUNS = ("anchor", "basket", "candle", "dragon", "engine", "falcon", "garden", "hammer", "island", "jacket",
              "kettle", "lantern", "mirror", "needle", "orchard", "pillow", "quiver", "rocket", "saddle", "tunnel")
_VAR_NAMES = [a + b + c for a in "ABCDEFGHJKLMNPQRSTUVWXYZ" for b in "ABCDEFGHJKLMNPQRSTUVWXYZ" for c in "QRSTUVWXYZ"]
_NUMBER = re.compile(r"\d+")


@dataclass(slots=True)
class RetrievalCase:
    task: str
    length: int  # the requested prompt length in tokens
    depth: float  # where the asked needle (the first of them, or the chain's start) sits in the haystack, 0..1
    prompt_ids: list[int]
    answers: list[str]  # one answer, or every expected value (multivalue)
    needle_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) tokens of each needle asked for
    distractor_spans: list[tuple[int, int]] = field(default_factory=list)
    haystack_tokens: int = 0  # filler tokens (prompt - task statement - needles - question)
    max_new_tokens: int = 8

    def to_dict(self) -> dict:
        return asdict(self)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _assemble(tok, length: int, intro: str, needles: list[tuple[float, str, bool]], question: str,
              first_special: bool = True) -> tuple[list[int], list, list, int]:
    """intro + haystack with ``needles`` (depth in 0..1, text, asked?) at sentence boundaries + question.

    Returns the prompt ids, the token spans of the asked and of the distractor needles (in the order
    given) and the haystack's size. The haystack fills what is left of ``length`` with whole sentences."""
    head = tok(intro)["input_ids"] if first_special else _ids(tok, intro)
    tail = _ids(tok, question)
    needle_ids = [_ids(tok, " " + text) for _, text, _ in needles]
    room = length - len(head) - len(tail) - sum(map(len, needle_ids))
    sentences = [_ids(tok, " " + s) for s in HAYSTACK]
    hay: list[list[int]] = []
    used = 0
    while used + len(sentences[len(hay) % len(sentences)]) <= room:
        hay.append(sentences[len(hay) % len(sentences)])
        used += len(hay[-1])
    if room < 0 or not hay:
        raise ValueError(f"length: {length} tokens cannot hold this task's text and any haystack")
    # sentence boundary whose token offset in the haystack is nearest each needle's depth
    offsets = [0]
    for s in hay:
        offsets.append(offsets[-1] + len(s))
    slots = [min(range(len(offsets)), key=lambda b: abs(offsets[b] - depth * used)) for depth, _, _ in needles]
    order = sorted(range(len(needles)), key=lambda n: (slots[n], n))  # stable: a chain keeps its order
    ids = list(head)
    positions = [0] * len(needles)
    nxt = 0
    for b in range(len(hay) + 1):
        while nxt < len(order) and slots[order[nxt]] == b:
            positions[order[nxt]] = (len(ids), len(ids) + len(needle_ids[order[nxt]]))
            ids += needle_ids[order[nxt]]
            nxt += 1
        if b < len(hay):
            ids += hay[b]
    ids += tail
    asked = [p for p, (_, _, a) in zip(positions, needles) if a]
    other = [p for p, (_, _, a) in zip(positions, needles) if not a]
    return ids, asked, other, used


def _number(rng: random.Random, digits: int, taken: set[str]) -> str:
    while True:
        n = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
        if n not in taken:
            taken.add(n)
            return n


def make_case(tok, task: str, length: int, depth: float, rng: random.Random, keys: int = 4, values: int = 3,
              hops: int = 3, context: int | None = None) -> RetrievalCase:
    """One case of ``task`` in at most ``length`` tokens with its asked needle at ``depth`` (0: right
    after the task statement, 1: right before the question); the other needles at seeded depths.
    ``context``: the model's context; the prompt then leaves room for the answer's tokens in it."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: expected a fraction in [0, 1], got {depth!r}")
    if keys < 1 or values < 1 or hops < 1:
        raise ValueError(f"keys/values/hops: expected >= 1, got {keys}, {values}, {hops}")
    taken: set[str] = set()
    if task == "passkey":
        key = _number(rng, 5, taken)
        needles = [(depth, f"The pass key is {key}. Remember it. {key} is the pass key.", True)]
        question, answers, new = "\n\nNow, what is the pass key? Answer with the number only.\nThe pass key is", [key], 8
    elif task in ("multikey", "multivalue"):
        names = rng.sample([f"{a}-{b}" for a in _KEY_WORDS for b in _KEY_NOUNS], keys)
        asked = names[0]
        answers = [_number(rng, 6, taken) for _ in range(1 if task == "multikey" else values)]
        needles = [(depth if i == 0 else rng.random(), f"One of the special magic numbers for {asked} is: {v}.", True)
                   for i, v in enumerate(answers)]
        needles += [(rng.random(), f"One of the special magic numbers for {n} is: {_number(rng, 6, taken)}.", False)
                    for n in names[1:]]
        if task == "multikey":
            question = (f"\n\nNow, what is the special magic number for {asked} mentioned in the provided text? "
                        f"Answer with the number only.\nThe special magic number for {asked} mentioned in the provided text is")
            new = 10
        else:
            question = (f"\n\nNow, what are all the special magic numbers for {asked} mentioned in the provided text? "
                        f"Answer with the numbers only.\nThe special magic numbers for {asked} mentioned in the provided text are")
            new = 10 * values + 4
    else:  # vartrack
        names = rng.sample(_VAR_NAMES, 2 * (hops + 1))
        value, other = _number(rng, 5, taken), _number(rng, 5, taken)
        later = sorted(depth + (1.0 - depth) * rng.random() for _ in range(hops))
        needles = [(depth, f"VAR {names[0]} = {value}.", True)]
        needles += [(d, f"VAR {names[i + 1]} = VAR {names[i]}.", True) for i, d in enumerate(later)]
        dist = sorted(rng.random() for _ in range(hops + 1))
        needles += [(dist[0], f"VAR {names[hops + 1]} = {other}.", False)]
        needles += [(dist[i + 1], f"VAR {names[hops + 2 + i]} = VAR {names[hops + 1 + i]}.", False)
                    for i in range(hops)]
        question = (f"\n\nNow, what is the value of VAR {names[hops]}? Answer with the number only.\n"
                    f"The value of VAR {names[hops]} is")
        answers, new = [value], 8
    room = length if context is None else min(length, context - new)
    ids, asked, other, hay = _assemble(tok, room, _INTRO[task], needles, question)
    return RetrievalCase(task, length, depth, ids, answers, asked, other, hay, new)


def make_cases(tok, task: str, length: int, n: int = 20, seed: int = 0, **kw) -> list[RetrievalCase]:
    """``n`` seeded cases with the asked needle's depth spread evenly over [0, 1]."""
    if n < 1:
        raise ValueError(f"n: expected >= 1 cases, got {n}")
    rng = random.Random(f"{seed}-{task}-{length}")
    return [make_case(tok, task, length, i / (n - 1) if n > 1 else 0.5, rng, **kw) for i in range(n)]


def numbers(text: str | None) -> list[str]:
    """The numbers of a generated text, in order."""
    return _NUMBER.findall(text or "")


def score(task: str, answers: list[str], text: str | None) -> float:
    """1/0 for a single answer (the first number generated must be it); for ``multivalue`` the fraction
    of ``answers`` among the first ``len(answers)`` distinct numbers generated."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    if not answers:
        raise ValueError("answers: expected at least one expected value")
    found = numbers(text)
    if task in SINGLE_ANSWER:
        return float(bool(found) and found[0] == answers[0])
    first: list[str] = []
    for x in found:
        if x not in first:
            first.append(x)
        if len(first) == len(answers):
            break
    return len(set(first) & set(answers)) / len(set(answers))


CALIBRATION = 0.8  # vanilla's accuracy at or above which a task is informative at a length


def informative(vanilla: dict, threshold: float = CALIBRATION) -> dict:
    """``{(task, length): vanilla accuracy}`` -> ``{(task, length): vanilla accuracy >= threshold}``."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: expected a fraction in [0, 1], got {threshold!r}")
    return {key: acc >= threshold for key, acc in vanilla.items()}


# ---------------------------------------------------------------------------- running the cases


def generate_answers(lm, cases: list[RetrievalCase], evict: bool = True,
                     defer_fraction: float | None = None) -> tuple[list[str], float]:
    """Greedy answers through the paged runtime (``dms_runtime.generate``), eviction on or off; and
    the KV tokens held at the end of generation over all cases / a dense cache's (1.0 without eviction).
    ``defer_fraction``: DMS with deferred eviction (``PagedConfig.defer_budget``) at the budget a policy
    gets for the case (``policies.policy_budget``: that fraction of the prompt per layer and KV head)."""
    from ..api import generate
    from ..paged import PagedConfig
    from .policies import policy_budget
    from .training_backend import eviction_off

    texts: list[str] = [""] * len(cases)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, c in enumerate(cases):
        defer = policy_budget(defer_fraction, len(c.prompt_ids)) if defer_fraction is not None else 0
        groups.setdefault((c.max_new_tokens, defer), []).append(i)
    live = dense = 0
    for (new, defer), idx in groups.items():
        prompts = [cases[i].prompt_ids for i in idx]
        if evict:
            paged = PagedConfig(max_seqs=len(prompts), defer_budget=defer) if defer else None
            res = generate(lm, prompts, max_new_tokens=new, chat=False, paged=paged)
        else:
            with eviction_off(lm.model):
                res = generate(lm, prompts, max_new_tokens=new, chat=False)
        for i, t in zip(idx, res.texts):
            texts[i] = t or ""
        live += res.stats.kv.live_tokens
        dense += res.stats.kv.dense_tokens
    return texts, (live / dense if dense else 1.0)


def policy_answers(lm, cases: list[RetrievalCase], policy: str, budget_fraction: float) -> tuple[list[str], list[float]]:
    """Greedy answers under a heuristic policy holding ``ceil(budget_fraction * prompt length)`` KV
    tokens per layer and KV head; also the peak held fraction of each case."""
    from .policies import policy_budget, policy_generate

    texts, held = [], []
    cfg = lm.config
    for c in cases:
        n = len(c.prompt_ids)
        budget = policy_budget(budget_fraction, n)
        ids, backend = policy_generate(lm.model, c.prompt_ids, policy, budget, c.max_new_tokens, eos_ids=lm.eos_ids)
        texts.append(lm.tokenizer.decode(ids, skip_special_tokens=True))
        held.append(backend.held_peak / ((n + len(ids)) * cfg.num_kv_heads * cfg.num_layers))
    return texts, held


def accuracy(cases: list[RetrievalCase], texts: list[str]) -> float:
    return sum(score(c.task, c.answers, t) for c, t in zip(cases, texts)) / max(len(cases), 1)
