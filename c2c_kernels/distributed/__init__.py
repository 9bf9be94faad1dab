"""Tensor-parallel C2C fusion on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Every rank of a tensor-parallel group holds only its KV heads of the receiver and the sharer
cache. :func:`shard` slices a loaded checkpoint for one rank; :func:`fuse_all` fuses the rank's
local cache views in place with one all-reduce per call (see ``docs/distributed.md``).

    sharded = c2c.distributed.shard(ckpt, rank=tp_rank, world_size=tp_size)
    c2c.distributed.fuse_all(sharded, receiver_kv, sharer_kv, slot_mapping, sharer_slot_mapping,
                             group=tp_group)
"""
from .fuse import comm_bytes_per_token, fuse_all
from .shard import ShardedCheckpoint, shard, tp_head_ranges

__all__ = ["shard", "fuse_all", "ShardedCheckpoint", "tp_head_ranges", "comm_bytes_per_token"]
