"""The serving engine: requests, scheduler, continuous batching over the paged DMS cache."""

from .engine import Engine, EngineStats, StepOutput
from .vote import extract_answer, majority_vote

__all__ = ["Engine", "EngineStats", "StepOutput", "majority_vote", "extract_answer"]
