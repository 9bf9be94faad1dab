"""Tensor-parallel fusion (c2c_kernels.distributed) and fuser training under DDP / FSDP2, on
spawned gloo ranks (CPU). Each test is one launch of a worker in tests/distributed_workers.py;
every wait is bounded."""
import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import distributed_workers as workers  # noqa: E402

from c2c_kernels import backends  # noqa: E402
from c2c_kernels import distributed as c2c_dist  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# Every backend that runs on CPU tensors here (the distributed path merges through the op layer).
CPU_BACKENDS = [e.backend for e in backends.test_matrix(("cpu",)) if e.skip is None]


def test_fuse_all_two_ranks_replicated_sharer_head():
    # receiver 4 heads (2 per rank), sharer 1 head held by both ranks: counted once
    workers.launch(workers.fuse_worker, 2, (4, 8), (1, 6), None, None, CPU_BACKENDS)


def test_fuse_all_overlapping_sharer_split_and_pairs_all():
    # sharer heads 0-1 on rank 0, 1-2 on rank 1: head 1 is sent by rank 0 only (rank 1's columns
    # for it are zero); a plan of two rounds: one all-reduce per round
    workers.launch(workers.fuse_worker, 2, (4, 8), (3, 4), None, [(0, 2), (1, 3)], ["cpu"], True)


def test_fuse_all_four_ranks_replicated_receiver_heads_and_other_sharer_split():
    # receiver 2 heads on 4 ranks (each head on 2 ranks); sharer 4 heads at tensor-parallel
    # size 2 (ranks 0, 2 hold heads 0-1, ranks 1, 3 heads 2-3)
    sharer_split = [c2c_dist.tp_head_ranges(4, 2)[r % 2] for r in range(4)]
    # ... and a second sharer (2 heads, each on 2 ranks) in parallel mode: one all-reduce for both
    workers.launch(workers.fuse_worker, 4, (2, 4), (4, 3), None, sharer_split, CPU_BACKENDS, False, (2, 5))


def test_bad_inputs_raise_before_any_collective():
    workers.launch(workers.errors_worker, 2)


def test_ddp_training_matches_single_process():
    workers.launch(workers.ddp_worker, 2)


def test_fsdp2_training_matches_single_process():
    workers.launch(workers.fsdp_worker, 2)


# ---- no process group needed ----------------------------------------------------------------

def test_tp_head_ranges():
    assert c2c_dist.tp_head_ranges(8, 4) == ((0, 2), (2, 4), (4, 6), (6, 8))
    assert c2c_dist.tp_head_ranges(2, 8) == ((0, 1),) * 4 + ((1, 2),) * 4
    with pytest.raises(ValueError, match="cannot be split evenly"):
        c2c_dist.tp_head_ranges(6, 4)
    with pytest.raises(ValueError, match="cannot replicate"):
        c2c_dist.tp_head_ranges(3, 4)


def test_shard_slices_and_zeroes_replica_columns():
    ckpt = workers.make_problem((2, 4), (4, 3))[0]
    w = ckpt.weights
    split = [c2c_dist.tp_head_ranges(4, 2)[r % 2] for r in range(4)]
    shards = [c2c_dist.shard(ckpt, rank=r, world_size=4, sharer_heads=split) for r in range(4)]
    # receiver head 0 on ranks 0, 1: rank 0 sends its columns, rank 1 sends none
    assert shards[0].sends_receiver and not shards[1].sends_receiver
    assert not shards[2].sends_sharer and not shards[3].sends_sharer
    total_s = sum(torch.zeros_like(w.w_in_sharer).index_copy_(
        2, torch.arange(s.sharer_range[0] * 3, s.sharer_range[1] * 3), s.weights.w_in_sharer) for s in shards)
    assert torch.equal(total_s, w.w_in_sharer)  # every column exactly once
    assert torch.equal(shards[3].weights.w_out, w.w_out[:, 4:8])
    assert torch.equal(shards[3].weights.w_head, w.w_head[:, 1:2])
    assert shards[2].weights.ffn_w1 is w.ffn_w1  # the trunk is shared, not copied


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=2, world_size=2), "rank: 2 is not a rank"),
    (dict(rank=0, world_size=3), "cannot be split evenly"),
    (dict(rank=0, world_size=2, receiver_heads=8), "receiver_heads: 8 heads, but the checkpoint"),
    (dict(rank=0, world_size=2, sharer_heads=[(0, 1)]), r"sharer_heads: 1 head ranges, expected one"),
    (dict(rank=0, world_size=2, sharer_heads=[(0, 2), (0, 1)]), r"sharer_heads\[0\] = \(0, 2\)"),
    (dict(rank=0, world_size=2, receiver_heads=[(0, 2), (0, 2)]), "head 2 is held by no rank"),
])
def test_shard_bad_arguments(kwargs, match):
    ckpt = workers.make_problem((4, 8), (1, 6))[0]
    with pytest.raises(ValueError, match=match):
        c2c_dist.shard(ckpt, **kwargs)


SLOT_KERNELS = [e.backend for e in backends.test_matrix(("cpu",)) if e.skip is None
                and hasattr(backends.get(e.backend), "prepare")]


@pytest.mark.parametrize("backend", SLOT_KERNELS)
def test_slot_kernel_records_what_slots_prepare_reports(backend):
    """The no-sync path (a backend's slot kernel, which the distributed fuse_all uses) records
    what c2c_kernels.slots.prepare reports first."""
    from c2c_kernels import slots, status
    prepare = backends.get(backend).prepare
    buf = status.buffer("cpu")
    status.clear("cpu")
    r = torch.tensor([-1, 3, 2, 12, 1])
    s = torch.tensor([99, 1, 8, 0, 50])  # token 0 is padding: its sharer slot is not checked
    prepare(r, s, 10, 8, dedupe=False)
    argument, index, value, limit = slots.prepare(r, s, 10, 8, dedupe=False)[2][0]
    assert buf[:5].tolist() == [1, argument, index, value, limit] == [1, status.SHARER_SLOTS, 2, 8, 8]
    prepare(torch.tensor([11]), torch.tensor([0]), 10, 8, dedupe=False)  # one pending error is kept
    assert buf[:5].tolist() == [1, status.SHARER_SLOTS, 2, 8, 8]
    buf.zero_()
    prepare(torch.tensor([0, 10]), torch.tensor([0, 0]), 10, 8, dedupe=False)
    assert buf[:5].tolist() == [1, status.RECEIVER_SLOTS, 1, 10, 10]
    buf.zero_()
    prepare(torch.tensor([0, -1]), torch.tensor([0, -5]), 10, 8, dedupe=False)  # nothing bad
    assert buf.tolist() == [0] * status.SIZE


def test_fuse_all_argument_errors_without_a_group():
    ckpt, rkv, skv, rslots, sslots = workers.make_problem((4, 8), (1, 6))
    sharded = c2c_dist.shard(ckpt, rank=0, world_size=1)
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="torch.distributed is not initialized"):
            c2c_dist.fuse_all(sharded, rkv, skv, rslots, sslots)
    with pytest.raises(ValueError, match="sharded: expected a ShardedCheckpoint"):
        c2c_dist.fuse_all(ckpt, rkv, skv, rslots, sslots)
    with pytest.raises(ValueError, match="mode: expected 'parallel' or 'sequential'"):
        c2c_dist.fuse_all([sharded, sharded], rkv, [skv, skv], rslots, [sslots, sslots], mode="both")
    with pytest.raises(ValueError, match="one entry per checkpoint"):
        c2c_dist.fuse_all([sharded, sharded], rkv, [skv], rslots, sslots)
