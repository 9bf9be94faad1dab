"""The Python entry points: thin wrappers that turn layers and checkpoints into op calls."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from torch import Tensor

from . import ops  # registers torch.ops.c2c; ops.call_* run them at the least host cost
from .checkpoint import Checkpoint, FuserParams

KV = Sequence[Tensor]  # (keys view, values view) of one layer


def _check_pair(name: str, k: Tensor, v: Tensor) -> None:
    if isinstance(k, Tensor) and isinstance(v, Tensor) and k.shape != v.shape:
        raise ValueError(f"{name}: keys view {list(k.shape)} and values view {list(v.shape)} differ; "
                         f"K and V of one layer must share one pool geometry")


def fuse(receiver_k: Tensor, receiver_v: Tensor, sharer_k: Tensor, sharer_v: Tensor,
         receiver_slots: Tensor, sharer_slots: Tensor, params: FuserParams, *,
         backend: str = "auto", check_slots: bool = False) -> None:
    """Fuse one layer's sharer K/V into the receiver K/V views, in place.

    Views are ``[page, entry, head, dim]`` (see :mod:`c2c_kernels.layouts`); slots are int32 or
    int64 ``[T]``, a negative receiver slot is padding. A closed gate skips its side entirely.
    ``check_slots=True`` also checks slot ranges (a host sync: a debugging aid).
    """
    _check_pair("receiver", receiver_k, receiver_v)
    _check_pair("sharer", sharer_k, sharer_v)
    receivers, sharers, fusers = [], [], []
    if params.key_open:
        receivers.append(receiver_k), sharers.append(sharer_k), fusers.append(params.key_fuser)
    if params.value_open:
        receivers.append(receiver_v), sharers.append(sharer_v), fusers.append(params.value_fuser)
    if fusers:
        ops.call_fuse(receivers, sharers, receiver_slots, sharer_slots, params.weights, fusers, backend,
                      check_slots)


def _plan(ckpt: Checkpoint, sharer: int | None):
    """Rounds of (receiver_layer, side, sharer_layer, fuser), every open fuser: computed when the
    checkpoint was built (it is immutable), so nothing is cached here and tracing sees constants."""
    return ckpt.fusion_plan(sharer)


def _entries(plan, receiver_kv, sharer_kv):
    try:
        receivers = [receiver_kv[layer][side] for layer, side, _, _ in plan]
        sharers = [sharer_kv[layer][side] for _, side, layer, _ in plan]
    except (IndexError, KeyError) as e:
        error = e
    else:
        return receivers, sharers, [entry[3] for entry in plan]
    _check_layers(plan, receiver_kv, sharer_kv)  # the named error when a layer the checkpoint fuses is missing
    raise error


def _check_layers(plan, receiver_kv, sharer_kv) -> None:
    for receiver_layer, _, sharer_layer, _ in plan:
        if receiver_layer >= len(receiver_kv):
            raise ValueError(f"receiver_kv: the checkpoint fuses receiver layer {receiver_layer}, "
                             f"but only {len(receiver_kv)} layers were given")
        if sharer_layer >= len(sharer_kv):
            raise ValueError(f"sharer_kv: the checkpoint reads sharer layer {sharer_layer}, "
                             f"but only {len(sharer_kv)} layers were given")


def fuse_all(ckpt: Checkpoint | Sequence[Checkpoint], receiver_kv: Sequence[KV],
             sharer_kv: Sequence[KV] | Sequence[Sequence[KV]], receiver_slots: Tensor,
             sharer_slots: Tensor | Sequence[Tensor], *, mode: str = "parallel",
             backend: str = "auto", check_slots: bool = False, sharer: int | None = None) -> None:
    """Fuse every mapped layer of one or several sharers into the receiver cache, in place.

    ``receiver_kv[l]`` / ``sharer_kv[l]`` are layer ``l``'s ``(K, V)`` views. With one
    checkpoint every open fuser runs in one ``c2c::fuse`` call. With several (one per sharer;
    pass lists of ``sharer_kv`` and ``sharer_slots``), ``mode="parallel"`` computes every
    sharer's correction from the clean receiver rows and adds them all (``c2c::project`` per
    sharer, then one ``c2c::merge``); ``mode="sequential"`` fuses sharer after sharer.
    A receiver layer mapped to several pairs fuses the first (``ckpt.pairs == "first"``, the
    default) or, with ``pairs="all"``, each in turn: one call per pair, sequential on the
    receiver rows (in parallel mode, every pair's correction from the clean rows).
    """
    if isinstance(ckpt, Checkpoint):
        for round_ in _plan(ckpt, sharer):
            receivers, sharers, fusers = _entries(round_, receiver_kv, sharer_kv)
            ops.call_fuse(receivers, sharers, receiver_slots, sharer_slots, ckpt.weights, fusers, backend,
                          check_slots)
        return
    ckpts = list(ckpt)
    if mode not in ("parallel", "sequential"):
        raise ValueError(f"mode: expected 'parallel' or 'sequential', got {mode!r}")
    if not (len(sharer_kv) == len(ckpts) and not isinstance(sharer_slots, Tensor)
            and len(sharer_slots) == len(ckpts)):
        raise ValueError(f"with {len(ckpts)} checkpoints, sharer_kv and sharer_slots must be lists with "
                         f"one entry per checkpoint")
    if mode == "sequential":
        for c, kv, slots in zip(ckpts, sharer_kv, sharer_slots):
            fuse_all(c, receiver_kv, kv, receiver_slots, slots, backend=backend, check_slots=check_slots)
        return
    # parallel: every correction from the clean rows, then one merge per group of receiver
    # views fused by the same number of sharers.
    contributions = defaultdict(list)  # (receiver_layer, side) -> [(projection, head_scale)]
    for c, kv, slots in zip(ckpts, sharer_kv, sharer_slots):
        for round_ in _plan(c, None):
            receivers, sharers, fusers = _entries(round_, receiver_kv, kv)
            projection, head_scale = ops.call_project(
                receivers, sharers, receiver_slots, slots, c.weights, fusers, backend, check_slots)
            for row, (receiver_layer, side, _, _) in enumerate(round_):
                contributions[(receiver_layer, side)].append((projection[row], head_scale[row]))
    groups = defaultdict(list)
    for key, parts in contributions.items():
        groups[len(parts)].append(key)
    for keys in groups.values():
        caches = [receiver_kv[layer][side] for layer, side in keys]
        parts = [part for key in keys for part in contributions[key]]
        ops.call_merge(caches, receiver_slots, [p for p, _ in parts], [a for _, a in parts], backend,
                       check_slots)


def project(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, *,
            backend: str = "auto", check_slots: bool = False):
    """``(projection [R, T, Ht*Dt], head_scale [R, T, Ht])`` in fp32, without writing the cache."""
    return ops.call_project(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers,
                            backend, check_slots)


def merge(receiver_caches, receiver_slots, projections, head_scales, *, backend: str = "auto",
          check_slots: bool = False) -> None:
    """Add ``head_scale * projection`` of one or more sharers into the receiver views, in place."""
    ops.call_merge(receiver_caches, receiver_slots, projections, head_scales, backend, check_slots)
