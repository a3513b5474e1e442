"""The retrofit losses (semantics §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(student || teacher)`` over the vocabulary, averaged over positions where ``mask``.

    student_logits/teacher_logits ``[B, T, V]``; mask bool ``[B, T]`` (None: every position).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits: expected shape {tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}")
    ls = F.log_softmax(student_logits.float(), -1)
    lt = F.log_softmax(teacher_logits.float(), -1)
    kl = (ls.exp() * (ls - lt)).sum(-1)  # [B, T]
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
