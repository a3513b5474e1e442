"""The retrofit losses (semantics §4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``KL(student || teacher)`` over the vocabulary at each position: ``[B, T, V]`` logits -> ``[B, T]``."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits: expected shape {tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}")
    ls = F.log_softmax(student_logits.float(), -1)
    lt = F.log_softmax(teacher_logits.float(), -1)
    return (ls.exp() * (ls - lt)).sum(-1)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(student || teacher)`` over the vocabulary, averaged over positions where ``mask``.

    student_logits/teacher_logits ``[B, T, V]``; mask bool ``[B, T]`` (None: every position).
    """
    kl = token_kl(student_logits, teacher_logits)  # [B, T]
    if mask is None:
        return kl.mean()
    if mask.shape != kl.shape:
        raise ValueError(f"mask: expected shape {tuple(kl.shape)}, got {tuple(mask.shape)}")
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def compression_target(step: int, final_cr: float, steps_per_cr: int = 100, initial_cr: float = 1.0) -> float:
    """``1 - 1/CR`` with CR annealed linearly from ``initial_cr`` (1: no compression) to ``final_cr``,
    one unit per ``steps_per_cr``. A run that continues an earlier retrofit starts at its CR."""
    if final_cr < 1:
        raise ValueError(f"final_cr: expected >= 1, got {final_cr}")
    if not 1 <= initial_cr <= final_cr:
        raise ValueError(f"initial_cr: expected between 1 and final_cr={final_cr}, got {initial_cr}")
    if steps_per_cr < 1:
        raise ValueError(f"steps_per_cr: expected >= 1, got {steps_per_cr}")
    cr = min(float(final_cr), float(initial_cr) + step / steps_per_cr)
    return 1.0 - 1.0 / cr


@dataclass(slots=True)
class TopK:
    """The teacher at each position: ``logprobs``/``ids`` ``[B, T, k]`` (descending), ``log_tail`` ``[B, T]``."""

    logprobs: torch.Tensor
    ids: torch.Tensor
    log_tail: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int) -> "TopK":
        """The ``k`` most likely tokens of ``logits`` ``[B, T, V]`` and the log of the remaining mass."""
        if not 1 <= k <= logits.shape[-1]:
            raise ValueError(f"k: expected 1..{logits.shape[-1]} (the vocabulary), got {k}")
        lp = F.log_softmax(logits.float(), -1)
        vals, ids = lp.topk(k, dim=-1)
        # log(1 - sum p_topk), computed from the tokens outside the top k so it stays exact when small
        rest = lp.scatter(-1, ids, float("-inf"))
        log_tail = torch.logsumexp(rest, -1) if k < lp.shape[-1] else torch.full_like(lp[..., 0], float("-inf"))
        return cls(vals.contiguous(), ids.to(torch.int32).contiguous(), log_tail.contiguous())

    def to(self, device) -> "TopK":
        return TopK(self.logprobs.to(device), self.ids.to(device), self.log_tail.to(device))


def topk_kl(student_logits: torch.Tensor, teacher: TopK, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(student || teacher)`` over the teacher's top-k tokens plus one tail bucket, averaged over
    the positions where ``mask`` (as :func:`distillation_kl`, which it equals for k = V)."""
    if student_logits.shape[:-1] != teacher.log_tail.shape:
        raise ValueError(f"teacher: expected positions {tuple(student_logits.shape[:-1])}, "
                         f"got {tuple(teacher.log_tail.shape)}")
    ls = F.log_softmax(student_logits.float(), -1)
    ls_k = ls.gather(-1, teacher.ids.long())  # [B, T, k]
    q_k = ls_k.exp()
    head = (q_k * (ls_k - teacher.logprobs)).sum(-1)
    kl = head
    if teacher.ids.shape[-1] < ls.shape[-1]:  # k = V leaves no tail (and its logsumexp of nothing has no gradient)
        # the student's mass outside the teacher's top k, from its own tail (exact when small)
        log_q_tail = torch.logsumexp(ls.scatter(-1, teacher.ids.long(), float("-inf")), -1)
        kl = kl + log_q_tail.exp() * (log_q_tail - teacher.log_tail)
    if mask is None:
        return kl.mean()
    if mask.shape != kl.shape:
        raise ValueError(f"mask: expected shape {tuple(kl.shape)}, got {tuple(mask.shape)}")
    return (kl * mask).sum() / mask.sum().clamp(min=1)
