"""Worker functions for tests/test_distributed.py: each runs in a spawned process, one per
rank of a gloo group, and asserts on its own; :func:`launch` runs one with bounded waits."""
from __future__ import annotations

import datetime
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp

import c2c_kernels as c2c
from c2c_kernels import distributed as c2c_dist
from c2c_kernels.testing import TOLERANCES

INIT_TIMEOUT_S = 60


def _entry(rank, world_size, directory, fn, args):
    torch.set_num_threads(1)
    # A file store in a fresh directory per launch: no port to pick, nothing shared between tests.
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(directory, 'store')}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=INIT_TIMEOUT_S))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def launch(fn, world_size: int, *args, timeout: float = 240.0) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; a failing rank
    raises here (the others are terminated), and nothing waits longer than ``timeout``."""
    with tempfile.TemporaryDirectory() as directory:
        ctx = mp.start_processes(_entry, args=(world_size, directory, fn, args), nprocs=world_size,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout} s")


# ---- counting collectives ----------------------------------------------------------------------

COLLECTIVES = [(funcol, n) for n in ("all_reduce", "all_gather_tensor", "reduce_scatter_tensor",
                                     "all_reduce_coalesced", "all_to_all_single", "broadcast")]
COLLECTIVES += [(dist, n) for n in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
                                    "reduce_scatter_tensor", "all_to_all_single", "barrier", "reduce")]


class CountCollectives:
    """Wraps every collective entry point of ``torch.distributed`` (eager and functional):
    ``calls`` lists ``(name, bytes of the first tensor argument)``."""

    def __enter__(self):
        self.calls, self.saved = [], []
        for module, name in COLLECTIVES:
            original = getattr(module, name, None)
            if original is None:
                continue
            self.saved.append((module, name, original))

            def wrapper(*args, __original=original, __name=name, **kwargs):
                t = args[0] if args and isinstance(args[0], torch.Tensor) else None
                self.calls.append((__name, t.numel() * t.element_size() if t is not None else 0))
                return __original(*args, **kwargs)

            setattr(module, name, wrapper)
        return self

    def __exit__(self, *exc):
        for module, name, original in self.saved:
            setattr(module, name, original)


# ---- fusion ------------------------------------------------------------------------------------

def make_problem(receiver, sharer, layers=2, hidden=16, tokens=9, seed=0):
    """A checkpoint (one gate closed), full caches and slots with padding and a duplicate; the
    same on every rank."""
    (ht, dt), (hs, ds) = receiver, sharer
    gates = [True] * (2 * layers)
    gates[1] = False  # layer 0's values: closed, so not planned
    w = c2c.random_weights(2 * layers, hs, ds, ht, dt, hidden, hidden, 3, seed=seed, gates_open=gates)
    ckpt = c2c.make_checkpoint(w, {l: l for l in range(layers)}, sharer_heads=hs)
    g = torch.Generator().manual_seed(seed + 1)
    rkv = [tuple(torch.randn(5, 3, ht, dt, generator=g) for _ in range(2)) for _ in range(layers)]
    skv = [tuple(torch.randn(4, 4, hs, ds, generator=g) for _ in range(2)) for _ in range(layers)]
    rslots = torch.randperm(15, generator=g)[:tokens]
    rslots[2] = -1  # padding
    rslots[5] = rslots[7]  # a duplicate: the last valid token writes
    sslots = torch.randint(0, 16, (tokens,), generator=g)
    sslots[2] = 999  # a padding token's sharer slot is never read
    return ckpt, rkv, skv, rslots.to(torch.int32), sslots


def local_views(kv, start, stop):
    """This rank's heads of every layer, in a vLLM-like ``[2, pages, page, heads, dim]`` tensor."""
    out, storage = [], []
    for k, v in kv:
        t = torch.stack([k[:, :, start:stop], v[:, :, start:stop]]).contiguous()
        storage.append(t)
        out.append((t[0], t[1]))
    return out, storage


def fuse_worker(rank, world_size, receiver, sharer, receiver_heads, sharer_heads, backends, pairs_all=False,
                second_sharer=None):
    ckpt, rkv, skv, rslots, sslots = make_problem(receiver, sharer)
    if pairs_all:
        # layer 1 fused twice (projector 1, then projector 0 on the rows it wrote): two rounds,
        # one all-reduce each
        ckpt = ckpt.replace(mapping={0: {1: {0: ((0, 0),), 1: ((1, 1), (0, 0))}}}, pairs="all")
        assert len(ckpt.fusion_plan()) == 2
    want = [tuple(t.clone() for t in kv) for kv in rkv]
    c2c.fuse_all(ckpt, want, skv, rslots, sslots, backend="reference")
    sharded = c2c_dist.shard(ckpt, rank=rank, world_size=world_size, receiver_heads=receiver_heads,
                             sharer_heads=sharer_heads)
    r0, r1 = sharded.receiver_range
    s0, s1 = sharded.sharer_range
    written = torch.zeros(rkv[0][0].shape[0] * rkv[0][0].shape[1], dtype=torch.bool)
    written[rslots[rslots >= 0].long()] = True
    written = written.view(rkv[0][0].shape[:2])
    tol = TOLERANCES[torch.float32]
    for backend in backends:
        mine, storage = local_views(rkv, r0, r1)
        theirs, _ = local_views(skv, s0, s1)
        before = [t.clone() for t in storage]
        with CountCollectives() as count:
            c2c_dist.fuse_all(sharded, mine, theirs, rslots, sslots, backend=backend)
        # one all-reduce per call (per round of the plan), of [fusers, tokens, hidden] fp32
        assert count.calls == [("all_reduce", len(round_) * rslots.numel() * ckpt.weights.hidden_dim * 4)
                               for round_ in sharded.plan], (backend, count.calls)
        for layer, (got, old) in enumerate(zip(storage, before)):
            for side in range(2):
                ref = want[layer][side][:, :, r0:r1]
                torch.testing.assert_close(got[side], ref, atol=tol, rtol=tol,
                                           msg=lambda m: f"rank {rank} layer {layer} side {side} {backend}: {m}")
                # rows outside the slots: bit for bit what they were
                assert torch.equal(got[side][~written], old[side][~written])
        # the closed fuser (layer 0, values) left its rows alone
        assert torch.equal(storage[0][1], before[0][1])
    if second_sharer is not None:
        two_sharers(rank, world_size, receiver, sharer, sharer_heads, second_sharer)


def two_sharers(rank, world_size, receiver, sharer, sharer_heads, second):
    """Parallel mode with two sharers (different head counts): one all-reduce for both."""
    ckpt_a, rkv, skv_a, rslots, sslots_a = make_problem(receiver, sharer)
    ckpt_b, _, skv_b, _, sslots_b = make_problem(receiver, second, seed=5)
    sslots_b = (sslots_a * 3 + 1) % 16  # another gather from the same pool size
    sslots_b[2] = -7  # the padding token again: its sharer slot is never read
    want = [tuple(t.clone() for t in kv) for kv in rkv]
    c2c.fuse_all([ckpt_a, ckpt_b], want, [skv_a, skv_b], rslots, [sslots_a, sslots_b], mode="parallel",
                 backend="reference")
    a = c2c_dist.shard(ckpt_a, rank=rank, world_size=world_size, sharer_heads=sharer_heads)
    b = c2c_dist.shard(ckpt_b, rank=rank, world_size=world_size)
    mine, storage = local_views(rkv, *a.receiver_range)
    with CountCollectives() as count:
        sharer_kv = [local_views(skv_a, *a.sharer_range)[0], local_views(skv_b, *b.sharer_range)[0]]
        c2c_dist.fuse_all([a, b], mine, sharer_kv, rslots, [sslots_a, sslots_b], backend="cpu")
    fusers = len(a.plan[0]) + len(b.plan[0])
    assert count.calls == [("all_reduce", fusers * rslots.numel() * ckpt_a.weights.hidden_dim * 4)], count.calls
    r0, r1 = a.receiver_range
    tol = TOLERANCES[torch.float32]
    for layer, got in enumerate(storage):
        for side in range(2):
            torch.testing.assert_close(got[side], want[layer][side][:, :, r0:r1], atol=tol, rtol=tol)


def errors_worker(rank, world_size):
    """Every bad input raises a named ValueError before any collective runs."""
    import pytest
    receiver, sharer = (4, 8), (1, 6)
    ckpt, rkv, skv, rslots, sslots = make_problem(receiver, sharer)
    good = c2c_dist.shard(ckpt, rank=rank, world_size=world_size)
    mine, _ = local_views(rkv, *good.receiver_range)
    theirs, _ = local_views(skv, *good.sharer_range)
    solo = dist.new_subgroups(group_size=1)[0]  # collective creation: before the counted calls

    cases = [
        ("world_size=4", c2c_dist.shard(ckpt, rank=rank, world_size=4), mine, theirs, rslots, None),
        ("sliced for rank", c2c_dist.shard(ckpt, rank=1 - rank, world_size=2), mine, theirs, rslots, None),
        (r"receiver_kv\[0\]\[0\]: 4 heads x 8 dims, but rank", good, rkv, theirs, rslots, None),
        (r"sharer_kv\[0\]\[0\]: 1 heads x 3 dims, but rank", good, mine, [(k[:, :, :, :3], v[:, :, :, :3])
                                                                       for k, v in theirs], rslots, None),
        ("group: 1 ranks", good, mine, theirs, rslots, solo),
        (r"receiver_slots\[0\] = 99", good, mine, theirs, torch.cat([rslots.new_tensor([99]), rslots[1:]]), None),
    ]
    for match, sharded, r_kv, s_kv, slots, group in cases:
        with CountCollectives() as count, pytest.raises(ValueError, match=match):
            c2c_dist.fuse_all(sharded, r_kv, s_kv, slots, sslots, group=group)
        assert count.calls == [], (match, count.calls)
    dist.barrier()


# ---- training ----------------------------------------------------------------------------------

TRAIN = dict(sharer=(2, 4), receiver=(2, 6), hidden=16, tokens=6, fusers=[0, 1], steps=3, lr=0.5)


def train_data(world_size):
    """Per rank: (sharer rows, receiver rows, targets, generator seed): the global batch is the
    concatenation over ranks."""
    cfg = TRAIN
    (hs, ds), (ht, dt) = cfg["sharer"], cfg["receiver"]
    g = torch.Generator().manual_seed(7)
    r, t = len(cfg["fusers"]), cfg["tokens"]
    out = []
    for rank in range(world_size):
        out.append([(torch.randn(r, t, hs * ds, generator=g), torch.randn(r, t, ht * dt, generator=g),
                     torch.randn(r, t, ht * dt, generator=g)) for _ in range(cfg["steps"])])
    return out


def make_trainer():
    from c2c_kernels.training import FuserTrainer
    cfg = TRAIN
    (hs, ds), (ht, dt) = cfg["sharer"], cfg["receiver"]
    w = c2c.random_weights(2, hs, ds, ht, dt, cfg["hidden"], cfg["hidden"], 3, seed=3)
    # recompute=True: the GPU default path (each FFN's first GEMM recomputed in the backward)
    return FuserTrainer(w, dropout_p=0.2, total_steps=10, recompute=True)


def train(model, trainer, data, seeds, world_divisor, steps):
    """``steps`` SGD steps; per step, each (rows, seed) chunk's loss / world_divisor is summed."""
    opt = torch.optim.SGD(model.parameters(), lr=TRAIN["lr"])
    for step in range(steps):
        opt.zero_grad()
        for chunk, seed in zip(data, seeds):
            s, x, target = chunk[step]
            gen = torch.Generator().manual_seed(seed * 100 + step)
            fused = model(s, x, TRAIN["fusers"], generator=gen)
            ((fused - target).pow(2).mean() / world_divisor).backward()
        opt.step()
        trainer.advance()


def single_process_weights(world_size):
    trainer = make_trainer()
    data = train_data(world_size)
    train(trainer, trainer, data, list(range(world_size)), world_size, TRAIN["steps"])
    return {n: p.detach() for n, p in trainer.named_parameters()}


def ddp_worker(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel
    trainer = make_trainer()
    model = DistributedDataParallel(trainer)
    # DDP averages the gradients over ranks: each rank's loss is its chunk's mean, the average is
    # the global batch's loss (equal chunks).
    train(model, trainer, [train_data(world_size)[rank]], [rank], 1, TRAIN["steps"])
    _compare(rank, {n: p.detach() for n, p in trainer.named_parameters()}, world_size)


def fsdp_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    trainer = make_trainer()
    fully_shard(trainer, mesh=init_device_mesh("cpu", (world_size,)))
    train(trainer, trainer, [train_data(world_size)[rank]], [rank], 1, TRAIN["steps"])
    _compare(rank, {n: p.full_tensor().detach() for n, p in trainer.named_parameters()}, world_size)


def _compare(rank, got, world_size):
    want = single_process_weights(world_size)
    start = make_trainer()
    for name, value in want.items():
        # the run moved the weights, and both runs moved them alike
        assert not torch.allclose(value, getattr(start, name)), name
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=lambda m: f"rank {rank} {name}: {m}")
