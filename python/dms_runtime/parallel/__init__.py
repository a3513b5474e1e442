"""Tensor parallelism over torch.distributed: one model over several processes, the DMS cache
sharded by KV head (each rank holds only its heads' page lists; eviction needs no communication).

``load(..., tensor_parallel=N)`` under ``torchrun --nproc_per_node N`` gives each rank its shard;
on rank 0 an :class:`~dms_runtime.engine.Engine` is used as usual, the other ranks call
:func:`run_follower`; ``generate()`` does both by itself (every rank calls it, all get rank 0's
result). See docs/ARCHITECTURE.md, "Tensor parallelism".
"""

from .engine import RankZeroFailed, ShardedCacheView, end_call, keepalive, rank_stats, run_follower, shutdown
from .group import TPGroup, close, init_tensor_parallel, rank_zero_first
from .shard import (RowParallelLinear, TPShard, check_divisible, kv_heads_of, load_model_sharded,
                    load_named_weights_sharded, local_config, shard_rule)

follow = run_follower

__all__ = ["RankZeroFailed", "TPGroup", "TPShard", "init_tensor_parallel", "rank_zero_first", "close", "run_follower", "follow", "keepalive",
           "shutdown", "end_call", "rank_stats", "ShardedCacheView", "RowParallelLinear", "check_divisible",
           "local_config", "kv_heads_of", "shard_rule", "load_model_sharded", "load_named_weights_sharded"]
