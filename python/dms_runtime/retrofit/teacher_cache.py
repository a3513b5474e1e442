"""The teacher's next-token distributions, computed once per training sequence and kept on disk, so a
step that meets the sequence again (a second epoch, another run of a sweep on the same data) pays
for the student only.

Each position keeps the teacher's ``k`` largest log-probabilities, their token ids and the log of
the mass left in the tail. The distillation loss then compares the two distributions over those
``k`` tokens plus one bucket for the rest (:func:`.losses.topk_kl`): a lower bound of the full KL that
equals it when the tail is empty. A run with a cache uses this loss on every step, hit or miss, so
its steps do not depend on what the cache held.

Layout: ``<folder>/teacher_cache.json`` (what the entries were made with: base model, k, autocast,
vocabulary) and one ``<sha256 of the tokens>.safetensors`` per batch, written atomically.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import validation as V
from .losses import TopK
from .trainer import _atomic

META = "teacher_cache.json"
FORMAT = "dms-teacher-cache/1"


@dataclass(slots=True)
class CacheKey:
    """What the entries of one cache were computed with; a cache made otherwise is refused."""

    base_model: str
    k: int
    vocab: int
    dtype: str
    autocast_bf16: bool
    format: str = FORMAT


class TeacherCache:
    """``get(input_ids, lengths)`` -> :class:`TopK` or None; ``put(...)`` stores one."""

    def __init__(self, folder: str | Path, key: CacheKey):
        V.integer("teacher_top_k", key.k, 1, key.vocab)
        self.folder, self.key = Path(folder), key
        self.hits = self.misses = 0
        meta = self.folder / META
        if meta.is_file():
            try:
                found = json.loads(meta.read_text())
            except ValueError as e:
                raise V.UserError(f"{meta}: invalid JSON ({e})") from None
            if found != asdict(key):
                raise V.UserError(f"teacher_cache: {str(self.folder)!r} was made with {found}, this run needs "
                                  f"{asdict(key)}; give another folder")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            _atomic(meta, lambda p: p.write_text(json.dumps(asdict(key), indent=1)))

    def _path(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> Path:
        h = hashlib.sha256()
        h.update(str(tuple(input_ids.shape)).encode())
        h.update(input_ids.to(torch.int64).cpu().numpy().tobytes())
        h.update(lengths.to(torch.int64).cpu().numpy().tobytes())
        return self.folder / f"{h.hexdigest()[:32]}.safetensors"

    def get(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> TopK | None:
        from safetensors.torch import load_file

        path = self._path(input_ids, lengths)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            t = load_file(str(path))
            entry = TopK(t["logprobs"], t["ids"], t["log_tail"])
        except Exception as e:  # a damaged entry is recomputed, never trusted
            path.unlink(missing_ok=True)
            self.misses += 1
            print(f"teacher_cache: dropped the unreadable entry {path.name} ({type(e).__name__})")
            return None
        b, t_len = input_ids.shape
        if entry.log_tail.shape != (b, t_len) or entry.ids.shape != (b, t_len, self.key.k):
            raise V.UserError(f"teacher_cache: {path} holds shape {tuple(entry.ids.shape)}, expected "
                              f"{(b, t_len, self.key.k)}")
        self.hits += 1
        return entry

    def put(self, input_ids: torch.Tensor, lengths: torch.Tensor, teacher_logits: torch.Tensor) -> TopK:
        from safetensors.torch import save_file

        entry = TopK.from_logits(teacher_logits, self.key.k)
        tensors = {"logprobs": entry.logprobs.cpu(), "ids": entry.ids.cpu(), "log_tail": entry.log_tail.cpu()}
        _atomic(self._path(input_ids, lengths), lambda p: save_file(tensors, str(p)))
        return entry
