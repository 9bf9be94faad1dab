"""``fuse_all`` on a tensor-parallel rank's local cache views: one all-reduce per call.

Per call (every open fuser of the plan at once, ``E`` entries, ``T`` tokens):

1. checks, all before any collective (a bad argument raises on every rank alike, so no rank is
   left waiting in the collective): the group's size and this rank's place in it against the
   shard, the views' head counts against the rank's share, then every check of ``c2c::fuse``
   on the local views and slots;
2. the partial input Linear: ``u_r = S_r W_in_s[:, cols_r]^T + X_r W_in_r[:, cols_r]^T``
   stacked ``[E, T, H]`` (fp32);
3. ONE all-reduce (sum) of that stack over the group (a functional collective, so
   ``torch.compile`` can trace it); ``+ b_in``;
4. the replicated FFN trunk, then this rank's heads of the output Linear and of the head
   logits, and ``c2c::merge`` into the local receiver views (the package's op layer: slot
   semantics of :mod:`c2c_kernels.slots`, any backend).

A plan with several rounds (``pairs="all"``) runs one all-reduce per round: a later round reads
the rows an earlier one wrote. Several sharers in parallel mode share the one all-reduce.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from .. import backends
from .. import ops as c2c_ops
from .. import slots as _slots
from ..reference import RMS_EPS, slot_coords
from .shard import ShardedCheckpoint


def _fail(msg: str):
    raise ValueError(msg)


def _check_group(sharded: ShardedCheckpoint, group) -> None:
    if not isinstance(sharded, ShardedCheckpoint):
        _fail(f"sharded: expected a ShardedCheckpoint (c2c_kernels.distributed.shard), got {type(sharded).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        _fail("group: torch.distributed is not initialized (call torch.distributed.init_process_group)")
    size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        _fail("group: this process is not a member of the group")
    if size != sharded.world_size:
        _fail(f"group: {size} ranks, but the checkpoint was sharded for world_size={sharded.world_size}; "
              f"shard it for this group")
    if rank != sharded.rank:
        _fail(f"sharded: sliced for rank {sharded.rank}, but this process is rank {rank} of the group; "
              f"shard it with rank={rank}")


def _check_heads(name: str, view, heads: int, dim: int, sharded: ShardedCheckpoint, which: str) -> None:
    if isinstance(view, torch.Tensor) and view.dim() == 4 and (view.shape[2], view.shape[3]) != (heads, dim):
        start, stop = getattr(sharded, f"{which}_range")
        _fail(f"{name}: {view.shape[2]} heads x {view.shape[3]} dims, but rank {sharded.rank} of "
              f"{sharded.world_size} holds {which} heads [{start}, {stop}) = {heads} heads x {dim}")


def _entries(sharded, round_, receiver_kv, sharer_kv):
    receivers, sharers = [], []
    for receiver_layer, side, sharer_layer, _ in round_:
        if receiver_layer >= len(receiver_kv):
            _fail(f"receiver_kv: the checkpoint fuses receiver layer {receiver_layer}, but only "
                  f"{len(receiver_kv)} layers were given")
        if sharer_layer >= len(sharer_kv):
            _fail(f"sharer_kv: the checkpoint reads sharer layer {sharer_layer}, but only "
                  f"{len(sharer_kv)} layers were given")
        rv, sv = receiver_kv[receiver_layer][side], sharer_kv[sharer_layer][side]
        _check_heads(f"receiver_kv[{receiver_layer}][{side}]", rv, sharded.receiver_heads,
                     sharded.receiver_head_dim, sharded, "receiver")
        _check_heads(f"sharer_kv[{sharer_layer}][{side}]", sv, sharded.sharer_heads,
                     sharded.sharer_head_dim, sharded, "sharer")
        receivers.append(rv)
        sharers.append(sv)
    return receivers, sharers, [entry[3] for entry in round_]


def _gather(views: Sequence[torch.Tensor], slots: torch.Tensor) -> torch.Tensor:
    """``[E, T, heads*dim]`` fp32 rows of every view at ``slots`` (already made safe)."""
    rows = []
    for view in views:
        page, entry = slot_coords(view, slots)
        rows.append(view[page, entry].reshape(len(slots), -1))
    return torch.stack(rows).float()


def _rms(z, scale):
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + RMS_EPS) * scale.unsqueeze(1)


def _ffn(z, norm, w1, w2):
    """Batched over entries: ``z [E, T, H]``, ``w1 [E, I, H]``, ``w2 [E, H, I]``."""
    return z + torch.bmm(F.gelu(torch.bmm(_rms(z, norm), w1.transpose(1, 2))), w2.transpose(1, 2))


def _all_reduce(partial: torch.Tensor, group) -> torch.Tensor:
    """The one collective of a call (a functional all-reduce, traceable by torch.compile)."""
    return funcol.all_reduce(partial, "sum", group if group is not None else dist.group.WORLD)


class _Picker:
    """The stacked weights of one round's fusers, fp32. The plan of a checkpoint whose gates are
    all open is fusers 0, 1, 2, ...: read the stacks in place then (a copy per call otherwise)."""

    def __init__(self, weights, fusers):
        self.weights, self.fusers = weights, list(fusers)
        self.idx = torch.tensor(self.fusers, device=weights.device)
        self.contiguous = self.fusers == list(range(self.fusers[0], self.fusers[0] + len(self.fusers)))

    def __call__(self, t):
        f = self.fusers
        t = t.narrow(0, f[0], len(f)) if self.contiguous else t.index_select(0, self.idx)
        return t.float()


def _partial(sharded, receivers, sharers, fusers, receiver_slots, sharer_slots, backend):
    """``(partial [E, T, H] fp32, ok [T])``: this rank's share of the input Linear, and which
    tokens are fused (not padding, slots in range). Bad slots follow the backend, as in
    ``c2c::fuse``: one with a slot kernel (Triton, CUDA) skips and records them on the device
    without a host sync; the others raise here, before the collective (the slots being the same
    on every rank, every rank raises)."""
    w = sharded.weights
    r, s = receiver_slots.long(), sharer_slots.long()
    rows_r, rows_s = _slots.rows(receivers[0]), _slots.rows(sharers[0])
    prepare = getattr(backends.resolve(backend, r.device), "prepare", None)
    if prepare is not None:
        r, s = prepare(receiver_slots, sharer_slots, rows_r, rows_s, dedupe=False)
        ok = r >= 0
    else:
        ok = (r >= 0) & (r < rows_r) & (s >= 0) & (s < rows_s)
        if not bool(ok[r >= 0].all()):
            _slots.raise_first(_slots.prepare(receiver_slots, sharer_slots, rows_r, rows_s, dedupe=False)[2])
    zero = torch.zeros((), dtype=torch.long, device=r.device)
    # Padding and bad tokens read row 0 and are never written (see ok).
    pick = _Picker(w, fusers)
    partial = torch.zeros(len(fusers), r.shape[0], w.hidden_dim, device=w.device)
    if sharded.sends_sharer:
        partial.baddbmm_(_gather(sharers, torch.where(ok, s, zero)), pick(w.w_in_sharer).transpose(1, 2))
    if sharded.sends_receiver:
        partial.baddbmm_(_gather(receivers, torch.where(ok, r, zero)), pick(w.w_in_receiver).transpose(1, 2))
    return partial, ok


def _finish(sharded, fusers, u):
    """``(projection [E, T, ht*Dt], head_scale [E, T, ht])`` of this rank's receiver heads from
    the reduced input Linear ``u`` (bias not yet added)."""
    w = sharded.weights
    pick = _Picker(w, fusers)
    u = u + pick(w.b_in).unsqueeze(1)
    norm, w1, w2 = pick(w.ffn_norm), pick(w.ffn_w1), pick(w.ffn_w2)
    u = _ffn(u, norm[:, 0], w1[:, 0], w2[:, 0])
    head = _ffn(u, pick(w.head_norm), pick(w.head_w1), pick(w.head_w2))
    logits = torch.baddbmm(pick(w.b_head).unsqueeze(1), head, pick(w.w_head).transpose(1, 2))
    for b in range(1, w.num_blocks):
        u = _ffn(u, norm[:, b], w1[:, b], w2[:, b])
    projection = torch.baddbmm(pick(w.b_out).unsqueeze(1), u, pick(w.w_out).transpose(1, 2))
    gate = (w.gate_logit.index_select(0, pick.idx) > 0).float().view(len(fusers), 1, 1)
    return projection, gate * torch.sigmoid(logits)


def _round(sharded, receivers, sharers, fusers, receiver_slots, sharer_slots, backend, group):
    partial, ok = _partial(sharded, receivers, sharers, fusers, receiver_slots, sharer_slots, backend)
    projection, head_scale = _finish(sharded, fusers, _all_reduce(partial, group))
    r = receiver_slots.long()
    torch.ops.c2c.merge(receivers, torch.where(ok, r, torch.full_like(r, -1)), list(projection.unbind(0)),
                        list(head_scale.unbind(0)), backend, False)


def _checked_rounds(sharded, receiver_kv, sharer_kv, receiver_slots, sharer_slots, check_slots):
    rounds = []
    for round_ in sharded.plan:
        receivers, sharers, fusers = _entries(sharded, round_, receiver_kv, sharer_kv)
        c2c_ops.check_fuse_args(receivers, sharers, receiver_slots, sharer_slots, list(sharded.weights),
                                fusers, check_slots=check_slots)
        rounds.append((round_, receivers, sharers, fusers))
    return rounds


def fuse_all(sharded: ShardedCheckpoint | Sequence[ShardedCheckpoint], receiver_kv, sharer_kv,
             receiver_slots: torch.Tensor, sharer_slots, *, group=None, mode: str = "parallel",
             backend: str = "auto", check_slots: bool = False) -> None:
    """Fuse every open fuser of ``sharded`` into this rank's receiver cache, in place.

    ``receiver_kv[l]`` / ``sharer_kv[l]`` are layer ``l``'s local ``(K, V)`` views holding this
    rank's heads (``sharded.receiver_range`` / ``sharded.sharer_range``); the slots are the
    engine's (the same on every rank). ``group``: the tensor-parallel process group (default:
    the world). Every rank of the group must call this with the same slots and plan. Slot
    semantics are those of :func:`c2c_kernels.fuse_all` (:mod:`c2c_kernels.slots`); on a GPU a
    bad slot is skipped and recorded without a host sync (``c2c.raise_pending_errors()``), and
    ``check_slots=True`` raises it first. ``backend`` picks the op layer's merge.

    Several sharers: a list of sharded checkpoints with lists of ``sharer_kv`` and
    ``sharer_slots``; ``mode="parallel"`` (every correction from the clean rows, summed, one
    all-reduce for all sharers) or ``"sequential"`` (one call per sharer).
    """
    if not isinstance(sharded, ShardedCheckpoint) and isinstance(sharded, (list, tuple)):
        return _fuse_all_sharers(list(sharded), receiver_kv, sharer_kv, receiver_slots, sharer_slots,
                                 group, mode, backend, check_slots)
    _check_group(sharded, group)
    rounds = _checked_rounds(sharded, receiver_kv, sharer_kv, receiver_slots, sharer_slots, check_slots)
    if receiver_slots.shape[0] == 0:
        return
    for _, receivers, sharers, fusers in rounds:
        _round(sharded, receivers, sharers, fusers, receiver_slots, sharer_slots, backend, group)


def _fuse_all_sharers(shards, receiver_kv, sharer_kv, receiver_slots, sharer_slots, group, mode, backend,
                      check_slots):
    if mode not in ("parallel", "sequential"):
        _fail(f"mode: expected 'parallel' or 'sequential', got {mode!r}")
    if not (len(sharer_kv) == len(shards) and not isinstance(sharer_slots, torch.Tensor)
            and len(sharer_slots) == len(shards)):
        _fail(f"with {len(shards)} sharded checkpoints, sharer_kv and sharer_slots must be lists with one "
              f"entry per checkpoint")
    checked = []
    for j, (sh, kv, slots) in enumerate(zip(shards, sharer_kv, sharer_slots)):
        _check_group(sh, group)
        rounds = _checked_rounds(sh, receiver_kv, kv, receiver_slots, slots, check_slots)
        if mode == "parallel" and len(rounds) > 1:
            _fail(f"sharded[{j}]: a plan of {len(rounds)} rounds (pairs='all') cannot be fused in parallel "
                  f"with other sharers; use mode='sequential'")
        checked.append(rounds)
    if receiver_slots.shape[0] == 0:
        return
    if mode == "sequential":
        for sh, rounds, slots in zip(shards, checked, sharer_slots):
            for _, receivers, sharers, fusers in rounds:
                _round(sh, receivers, sharers, fusers, receiver_slots, slots, backend, group)
        return
    # parallel: every sharer's partial input Linear in one all-reduce, then every correction
    # from the clean rows, merged per group of receiver views fused by the same number of sharers
    # (as c2c_kernels.fuse_all does).
    parts, oks, sizes = [], [], []
    for sh, rounds, slots in zip(shards, checked, sharer_slots):
        for _, receivers, sharers, fusers in rounds:
            partial, ok = _partial(sh, receivers, sharers, fusers, receiver_slots, slots, backend)
            parts.append(partial), oks.append(ok), sizes.append(len(fusers))
    if not parts:
        return
    reduced = _all_reduce(torch.cat(parts), group).split(sizes)
    r = receiver_slots.long()
    first_receiver = next(rounds[0][1][0] for rounds in checked if rounds)
    live = (r >= 0) & (r < _slots.rows(first_receiver))
    contributions = {}
    k = 0
    for sh, rounds in zip(shards, checked):
        for round_, _, _, fusers in rounds:
            projection, head_scale = _finish(sh, fusers, reduced[k])
            # a token whose sharer slot is bad for this sharer gets no correction from it
            head_scale = head_scale * oks[k].view(1, -1, 1)
            for i, (receiver_layer, side, _, _) in enumerate(round_):
                contributions.setdefault((receiver_layer, side), []).append((projection[i], head_scale[i]))
            k += 1
    groups = {}
    for key, found in contributions.items():
        groups.setdefault(len(found), []).append(key)
    merge_slots = torch.where(live, r, torch.full_like(r, -1))
    for keys in groups.values():
        found = [p for key in keys for p in contributions[key]]
        torch.ops.c2c.merge([receiver_kv[layer][side] for layer, side in keys], merge_slots,
                            [p for p, _ in found], [a for _, a in found], backend, False)


def comm_bytes_per_token(sharded_or_hidden, fusers: int, world_size: int, *, dtype_bytes: int = 4) -> dict:
    """The all-reduce traffic model per token of one call over ``fusers`` fusers.

    ``payload``: bytes of the reduced tensor per token (``fusers * H * 4``); ``ring_per_rank``:
    what each rank sends in a ring all-reduce, ``2 (w-1)/w * payload``.
    """
    hidden = sharded_or_hidden.weights.hidden_dim if isinstance(sharded_or_hidden, ShardedCheckpoint) \
        else int(sharded_or_hidden)
    payload = fusers * hidden * dtype_bytes
    return {"payload": payload, "ring_per_rank": 2 * (world_size - 1) / world_size * payload}
