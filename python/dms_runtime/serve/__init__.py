"""``dms serve``: an OpenAI-compatible HTTP server over the continuous-batching engine."""

from .app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
