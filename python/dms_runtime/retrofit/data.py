"""Offline training data for retrofits: long documents available on any machine (the Python
standard library's source), synthetic long-context tasks with exact answers, and readers for
users' own JSONL/text files. Everything yields token-id sequences packed to a fixed length."""

from __future__ import annotations

import json
import random
import zlib
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

import torch


STDLIB_SPLITS = ("train", "heldout", "all")


def _heldout(relpath: str) -> bool:
    """One file in 20, chosen by a stable hash of its path: never trained on, used by ``dms eval``."""
    return zlib.crc32(relpath.encode()) % 20 == 0


def stdlib_documents(limit: int | None = None, seed: int = 0, split: str = "train",
                     names: bool = False) -> Iterator[str] | Iterator[tuple[str, str]]:
    """Source files of the running Python's standard library, in a seeded order.

    split: "train" (19 files in 20), "heldout" (the rest, for evaluation) or "all".
    names: yield ``(path relative to the library, text)`` instead of the text alone.
    """
    if split not in STDLIB_SPLITS:
        raise ValueError(f"split: expected one of {STDLIB_SPLITS}, got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    if split != "all":
        files = [p for p in files if _heldout(p.relative_to(root).as_posix()) == (split == "heldout")]
    random.Random(seed).shuffle(files)
    for i, path in enumerate(files):
        if limit is not None and i >= limit:
            return
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield (path.relative_to(root).as_posix(), text) if names else text


def text_documents(paths: Iterable[str | Path]) -> Iterator[str]:
    """Plain-text files, or JSONL files whose lines hold a "text" field."""
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"data: {str(p)!r} does not exist")
        if p.suffix == ".jsonl":
            with open(p, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        row = json.loads(line)
                        if "text" not in row:
                            raise ValueError(f"data: {p.name} line {n} has no 'text' field")
                        yield row["text"]
        else:
            yield p.read_text(encoding="utf-8")


_WORDS = ("alpha bravo cedar delta ember fable grove harbor island jasper kettle lumen meadow nectar orbit "
          "pepper quartz river saddle timber umber velvet willow xenon yonder zephyr").split()


def passkey_task(n_filler: int, rng: random.Random) -> tuple[str, str]:
    """A passkey hidden in filler text; the answer is the number."""
    key = str(rng.randint(10000, 99999))
    filler = " ".join(rng.choice(_WORDS) for _ in range(n_filler))
    cut = rng.randint(0, len(filler))
    text = (f"{filler[:cut]} The pass key is {key}. Remember it. {filler[cut:]}\n"
            f"What is the pass key? The pass key is")
    return text, f" {key}"


def variable_tracking_task(n_filler: int, hops: int, rng: random.Random) -> tuple[str, str]:
    """Chained assignments in filler text; the answer is the value reached after ``hops`` hops."""
    value = str(rng.randint(100, 999))
    names = rng.sample([a + b for a in "ABCDEFGHJKLMNPQRSTUVWXYZ" for b in "abcdefghijk"], hops + 1)
    lines = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    words = [rng.choice(_WORDS) for _ in range(n_filler)]
    for line in lines:
        words.insert(rng.randint(0, len(words)), line)
    return " ".join(words) + f"\nWhat is the value of VAR {names[-1]}? It is", f" {value}"


def synthetic_documents(n: int, n_filler: int, seed: int = 0) -> Iterator[str]:
    rng = random.Random(seed)
    for i in range(n):
        q, a = passkey_task(n_filler, rng) if i % 2 == 0 else variable_tracking_task(n_filler, 3, rng)
        yield q + a


def pack(documents: Iterable[str], tokenizer, seq_len: int, eos_id: int | None = None) -> Iterator[list[int]]:
    """Concatenate tokenized documents (separated by EOS) and cut them into ``seq_len`` pieces."""
    if seq_len < 2:
        raise ValueError(f"seq_len: expected >= 2, got {seq_len}")
    buf: list[int] = []
    for doc in documents:
        buf.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos_id is not None:
            buf.append(eos_id)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]


def batches(sequences: Iterable[list[int]], batch_size: int) -> Iterator[torch.Tensor]:
    """``[batch_size, seq_len]`` int64 tensors (a last partial batch is dropped)."""
    group: list[list[int]] = []
    for s in sequences:
        group.append(s)
        if len(group) == batch_size:
            yield torch.tensor(group, dtype=torch.int64)
            group = []


_TOPICS = ("the water cycle", "binary search", "photosynthesis", "the French revolution", "prime numbers",
           "how a compiler works", "supply and demand", "black holes", "the immune system", "recursion",
           "plate tectonics", "hash tables", "the Roman empire", "electric circuits", "probability",
           "machine learning", "the human heart", "climate change", "sorting algorithms", "volcanoes")
_ASKS = ("Explain {t} to a beginner.", "Write a short essay about {t}.", "Give three key facts about {t}.",
         "What are common misconceptions about {t}?", "Summarize {t} in a paragraph.",
         "Write a step-by-step explanation of {t}.", "Compare {t} with something from everyday life.")


def self_distillation_prompts(n: int, seed: int = 0) -> list[str]:
    """A seeded, varied prompt set (topics x kinds of request)."""
    rng = random.Random(seed)
    return [rng.choice(_ASKS).format(t=rng.choice(_TOPICS)) for _ in range(n)]


def self_distillation_documents(lm, n: int, seed: int = 0, max_new_tokens: int = 256,
                                cache_dir: str | Path | None = None) -> list[str]:
    """The model's own answers to ``n`` seeded prompts (prompt + answer, chat-formatted), generated
    once and cached as JSONL next to the converted models."""
    from ..api import generate
    from ..gguf_convert import cache_root

    folder = Path(cache_dir) if cache_dir else cache_root() / "selfdistill"
    folder.mkdir(parents=True, exist_ok=True)
    key = "".join(c if c.isalnum() else "_" for c in str(lm.name))[-60:]
    path = folder / f"{key}-n{n}-s{seed}-t{max_new_tokens}.jsonl"
    if path.is_file():
        return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    prompts = self_distillation_prompts(n, seed)
    res = generate(lm, prompts, max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9, seed=seed)
    docs = []
    for p, ids in zip(prompts, res.token_ids):
        chat = lm.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                tokenize=False) if lm.tokenizer.chat_template else p + "\n"
        docs.append(chat + lm.tokenizer.decode(ids, skip_special_tokens=False))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"prompt": p, "text": d}) + "\n" for p, d in zip(prompts, docs)))
    tmp.replace(path)
    return docs
