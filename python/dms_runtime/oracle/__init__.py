"""The oracle runtime: a dense KV cache plus the DMS visibility rule.

It is the oracle the fast (paged) runtime is tested against, token for token.
"""

from .cache import DenseDMSCache
from .generate import generate_oracle

__all__ = ["DenseDMSCache", "generate_oracle"]
