"""The paged runtime: a page pool shared by every (layer, sequence, KV head) list, the attention
backends that read it, and the engine that schedules requests over it."""

from .cache import PagedConfig, PagedKVCache, PoolExhausted

__all__ = ["PagedConfig", "PagedKVCache", "PoolExhausted"]
