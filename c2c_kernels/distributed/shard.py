"""Slicing a loaded checkpoint for one rank of a tensor-parallel group.

Rank ``r`` of ``w`` holds receiver KV heads ``receiver_ranges[r]`` and sharer KV heads
``sharer_ranges[r]`` (``[start, stop)``). Its share of every stacked fuser weight:

- the input Linear is row-parallel: ``W_in`` columns of the rank's heads, so that the sum over
  ranks of ``W_in[:, cols_r] [s; x][cols_r]`` is the full product. A head held by several
  ranks (replicated KV heads, or a sharer at another tensor-parallel size) is contributed by
  the lowest rank holding it; the other replicas' columns are zero and their GEMM is skipped
  when nothing of theirs is left, so the all-reduce counts every column exactly once.
- the FFN trunk (``FFN_1``, the projection blocks, the weight branch) is replicated;
- the output is column-parallel: rows of ``W_out`` / ``b_out`` and of ``W_head`` / ``b_head``
  for the rank's receiver heads (a per-head weight needs only its own head's logit).
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from ..checkpoint import Checkpoint
from ..weights import FuserWeights

HeadRanges = tuple[tuple[int, int], ...]


def _fail(msg: str):
    raise ValueError(msg)


def tp_head_ranges(total_heads: int, world_size: int) -> HeadRanges:
    """The KV heads each rank holds under vLLM / SGLang tensor parallelism: ``[r*H/w, (r+1)*H/w)``
    when ``w <= H`` (``H % w == 0``), else head ``r // (w/H)`` (``w % H == 0``; each head on
    ``w/H`` ranks)."""
    for name, value in (("total_heads", total_heads), ("world_size", world_size)):
        if type(value) is not int or value < 1:
            _fail(f"{name}: expected an integer >= 1, got {value!r}")
    if world_size <= total_heads:
        if total_heads % world_size:
            _fail(f"{total_heads} KV heads cannot be split evenly over {world_size} ranks")
        n = total_heads // world_size
        return tuple((r * n, (r + 1) * n) for r in range(world_size))
    if world_size % total_heads:
        _fail(f"{world_size} ranks cannot replicate {total_heads} KV heads evenly (world_size must be a "
              f"multiple of the head count when it exceeds it)")
    replicas = world_size // total_heads
    return tuple((r // replicas, r // replicas + 1) for r in range(world_size))


def _ranges(name: str, spec, total: int, world_size: int) -> HeadRanges:
    if spec is None or isinstance(spec, int):
        if spec is not None and spec != total:
            _fail(f"{name}: {spec} heads, but the checkpoint's fusers were built for {total}")
        return tp_head_ranges(total, world_size)
    ranges = tuple(tuple(r) for r in spec)
    if len(ranges) != world_size:
        _fail(f"{name}: {len(ranges)} head ranges, expected one (start, stop) per rank ({world_size})")
    held = [False] * total
    for r, rng in enumerate(ranges):
        if len(rng) != 2 or not all(type(v) is int for v in rng) or not 0 <= rng[0] < rng[1] <= total:
            _fail(f"{name}[{r}] = {rng}: expected (start, stop) with 0 <= start < stop <= {total}")
        for h in range(*rng):
            held[h] = True
    if not all(held):
        _fail(f"{name}: head {held.index(False)} is held by no rank; every head of the {total} must be "
              f"on some rank (the input layer reads all of them)")
    return ranges


def _contributed(ranges: HeadRanges, rank: int) -> list[bool]:
    """Per head of ``rank``'s range: does this rank contribute its columns (first holder)?"""
    start, stop = ranges[rank]
    return [not any(a <= h < b for a, b in ranges[:rank]) for h in range(start, stop)]


@dataclass(frozen=True, eq=False)
class ShardedCheckpoint:
    """One rank's share of a checkpoint (build it with :func:`shard`).

    ``weights`` is a :class:`FuserWeights` of local widths: ``w_in_sharer`` ``[P, H, hs*Ds]``,
    ``w_in_receiver`` ``[P, H, ht*Dt]`` (columns of heads owned by a lower rank are zero),
    ``w_head`` ``[P, ht, H]``, ``w_out`` ``[P, ht*Dt, H]``, the trunk and ``b_in`` whole.
    ``plan`` is the full checkpoint's fusion plan (rounds of ``(receiver_layer, side,
    sharer_layer, fuser)``), fixed when sharded.
    """

    weights: FuserWeights
    rank: int
    world_size: int
    receiver_ranges: HeadRanges
    sharer_ranges: HeadRanges
    receiver_head_dim: int
    sharer_head_dim: int
    sends_sharer: bool  # does this rank contribute any sharer columns to the all-reduce
    sends_receiver: bool
    plan: tuple

    @property
    def receiver_range(self) -> tuple[int, int]:
        return self.receiver_ranges[self.rank]

    @property
    def sharer_range(self) -> tuple[int, int]:
        return self.sharer_ranges[self.rank]

    @property
    def receiver_heads(self) -> int:
        """Receiver KV heads on this rank."""
        return self.receiver_range[1] - self.receiver_range[0]

    @property
    def sharer_heads(self) -> int:
        return self.sharer_range[1] - self.sharer_range[0]

    def to(self, device=None, dtype=None) -> "ShardedCheckpoint":
        import dataclasses
        return dataclasses.replace(self, weights=self.weights.to(device=device, dtype=dtype))


def shard(ckpt: Checkpoint, *, rank: int, world_size: int, receiver_heads=None, sharer_heads=None,
          sharer: int | None = None) -> ShardedCheckpoint:
    """Slice ``ckpt`` for rank ``rank`` of a tensor-parallel group of ``world_size``.

    ``receiver_heads`` / ``sharer_heads``: None or the model's total KV head count (split as
    vLLM / SGLang do, :func:`tp_head_ranges`), or ``world_size`` ``(start, stop)`` ranges, one
    per rank, for any other split (e.g. a sharer at another tensor-parallel size:
    ``[tp_head_ranges(Hs, 2)[r % 2] for r in range(4)]``). Ranges may overlap (replicas) but
    must cover every head. ``sharer``: which sharer of a multi-sharer checkpoint.
    """
    if not isinstance(ckpt, Checkpoint):
        _fail(f"ckpt: expected a loaded Checkpoint, got {type(ckpt).__name__}")
    for name, value in (("world_size", world_size), ("rank", rank)):
        if type(value) is not int:
            _fail(f"{name}: expected an integer, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        _fail(f"rank: {rank} is not a rank of a group of world_size={world_size}")
    w = ckpt.weights
    ht = w.receiver_heads
    args = ckpt.projector_args[0] if ckpt.projector_args else {}
    hs = args.get("source_num_heads")
    if hs is None or w.sharer_width % hs:
        _fail(f"ckpt: cannot tell the sharer's head count (projector args say {hs!r}, sharer width "
              f"{w.sharer_width})")
    rr = _ranges("receiver_heads", receiver_heads, ht, world_size)
    sr = _ranges("sharer_heads", sharer_heads, hs, world_size)
    dt, ds = w.receiver_width // ht, w.sharer_width // hs

    def columns(full, ranges, dim):
        start, stop = ranges[rank]
        part = full[:, :, start * dim:stop * dim].clone()
        mask = torch.tensor(_contributed(ranges, rank), device=full.device).repeat_interleave(dim)
        part[:, :, ~mask] = 0  # replicas of a head owned by a lower rank add nothing
        return part.contiguous(), bool(mask.any())

    w_in_s, sends_s = columns(w.w_in_sharer, sr, ds)
    w_in_r, sends_r = columns(w.w_in_receiver, rr, dt)
    h0, h1 = rr[rank]
    local = w._replace(
        w_in_sharer=w_in_s, w_in_receiver=w_in_r,
        w_head=w.w_head[:, h0:h1].contiguous(), b_head=w.b_head[:, h0:h1].contiguous(),
        w_out=w.w_out[:, h0 * dt:h1 * dt].contiguous(), b_out=w.b_out[:, h0 * dt:h1 * dt].contiguous())
    return ShardedCheckpoint(local, rank, world_size, rr, sr, dt, ds, sends_s, sends_r,
                             tuple(ckpt.fusion_plan(sharer)))
