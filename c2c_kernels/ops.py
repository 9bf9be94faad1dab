"""``torch.ops.c2c``: registration, fake implementations, argument checks, backend dispatch.

Three ops, all on lists of per-layer cache views so that every layer (keys and values) goes
through one call:

- ``c2c::fuse(receiver_caches!, sharer_caches, receiver_slots, sharer_slots, weights, fusers,
  backend, check_slots)``: entry ``i`` fuses ``sharer_caches[i]`` into ``receiver_caches[i]``
  (in place) with fuser ``fusers[i]`` of the stacked ``weights``. Every entry reads the
  receiver rows as they were when the call began.
- ``c2c::project(...) -> (projection [R, T, Ht*Dt], head_scale [R, T, Ht])`` (fp32): the
  corrections without writing them, ``head_scale = G * sigmoid(a)``.
- ``c2c::merge(receiver_caches!, receiver_slots, projections, head_scales, backend)``: adds
  ``sum_j head_scale * projection`` of ``S`` sharers per entry (parallel mode).

Cache views are ``[page, entry, head, dim]`` with any strides but a unit last stride; slot
``s`` is page ``s // size(1)``, entry ``s % size(1)``; a negative receiver slot is padding.
All errors are raised here, before a backend runs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import backends
from .weights import FuserWeights

CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SLOT_DTYPES = (torch.int32, torch.int64)


# ---- checks ----------------------------------------------------------------------------------

def _fail(msg: str):
    raise ValueError(msg)


def check_weights(weights: Sequence[Tensor]) -> FuserWeights:
    if len(weights) != len(FuserWeights._fields):
        _fail(f"weights: expected the {len(FuserWeights._fields)} stacked tensors of FuserWeights "
              f"{FuserWeights._fields}, got {len(weights)}")
    w = FuserWeights(*weights)
    p, h, ks = w.w_in_sharer.shape if w.w_in_sharer.dim() == 3 else _fail(
        f"weights.w_in_sharer: expected [fusers, hidden, sharer_width], got {list(w.w_in_sharer.shape)}")
    if w.ffn_w1.dim() != 4:
        _fail(f"weights.ffn_w1: expected [fusers, blocks, intermediate, hidden], got {list(w.ffn_w1.shape)}")
    nb, i = w.ffn_w1.shape[1], w.ffn_w1.shape[2]
    if w.w_head.dim() != 3:
        _fail(f"weights.w_head: expected [fusers, receiver_heads, hidden], got {list(w.w_head.shape)}")
    if w.w_in_receiver.dim() != 3:
        _fail(f"weights.w_in_receiver: expected [fusers, hidden, receiver_width], got {list(w.w_in_receiver.shape)}")
    ht, kt = w.w_head.shape[1], w.w_in_receiver.shape[2]
    expected = FuserWeights(
        (p, h, ks), (p, h, kt), (p, h), (p, nb, h), (p, nb, i, h), (p, nb, h, i), (p, h), (p, h, h),
        (p, h, h), (p, ht, h), (p, ht), (p, kt, h), (p, kt), (p,))
    dtype, device = w.w_in_sharer.dtype, w.w_in_sharer.device
    if dtype not in CACHE_DTYPES:
        _fail(f"weights: dtype {dtype} is not supported (expected one of {list(CACHE_DTYPES)})")
    for name, t, shape in zip(FuserWeights._fields, w, expected):
        if tuple(t.shape) != shape:
            _fail(f"weights.{name}: expected shape {list(shape)}, got {list(t.shape)}")
        if t.device != device:
            _fail(f"weights.{name}: on {t.device}, expected {device} like the other weights")
        want = torch.float32 if name == "gate_logit" else dtype
        if t.dtype != want:
            _fail(f"weights.{name}: dtype {t.dtype}, expected {want}")
    if nb < 2:
        _fail(f"weights.ffn_w1: {nb} FFN blocks on the projection path, expected >= 2 (num_layers >= 3)")
    if kt % ht:
        _fail(f"weights.w_out: output width {kt} is not a multiple of the {ht} receiver heads")
    return w


def _check_view(name: str, view: Tensor, dtype, device, heads: int | None, width: int) -> None:
    if not isinstance(view, Tensor) or view.dim() != 4:
        _fail(f"{name}: expected a 4-D [page, entry, head, dim] view, got "
              f"{list(view.shape) if isinstance(view, Tensor) else type(view).__name__}")
    if view.dtype != dtype:
        _fail(f"{name}: dtype {view.dtype}, expected {dtype} (the weights' dtype; use ckpt.to(dtype=...))")
    if view.device != device:
        _fail(f"{name}: on {view.device}, expected {device} (the weights' device)")
    if view.shape[2] * view.shape[3] != width or (heads is not None and view.shape[2] != heads):
        what = f"{heads} heads x {width // heads}" if heads else f"heads x dim = {width}"
        _fail(f"{name}: {view.shape[2]} heads x {view.shape[3]} dims, the fuser expects {what}")
    if view.stride(3) != 1 and view.shape[3] > 1:
        _fail(f"{name}: the head_dim stride is {view.stride(3)}, expected 1 (rows must be contiguous per head)")


def _check_slots(name: str, slots: Tensor, device) -> None:
    if not isinstance(slots, Tensor) or slots.dim() != 1:
        _fail(f"{name}: expected a 1-D tensor of slots, got "
              f"{list(slots.shape) if isinstance(slots, Tensor) else type(slots).__name__}")
    if slots.dtype not in SLOT_DTYPES:
        _fail(f"{name}: dtype {slots.dtype}, expected int32 or int64")
    if slots.device != device:
        _fail(f"{name}: on {slots.device}, expected {device} (the caches' device)")


def _check_views(name: str, views: Sequence[Tensor], dtype, device, heads: int | None, width: int) -> None:
    """Every view checked; entry 0 in detail, the others by a cheap comparison with it (this
    runs per call on lists of up to ~100 views, so it is kept to a few attribute reads each)."""
    if not views:
        return
    _check_view(f"{name}[0]", views[0], dtype, device, heads, width)
    shape = views[0].shape
    for i, v in enumerate(views):
        if not (isinstance(v, Tensor) and v.shape == shape and v.dtype == dtype
                and v.device == device and (v.stride(3) == 1 or shape[3] == 1)):
            _check_view(f"{name}[{i}]", v, dtype, device, heads, width)
            _fail(f"{name}[{i}]: shape {list(v.shape)} differs from {name}[0] {list(shape)}; "
                  f"one slot tensor addresses every entry, so all must share one pool geometry")


def _check_distinct(name: str, views: Sequence[Tensor]) -> None:
    keys = [(v.data_ptr(), v.stride()) for v in views]
    if len(set(keys)) == len(keys):
        return
    for i, key in enumerate(keys):
        first = keys.index(key)
        if first != i:
            _fail(f"{name}[{i}] is the same view as {name}[{first}]; each entry must write its own rows")


def check_slot_ranges(receiver_caches, sharer_caches, receiver_slots, sharer_slots) -> None:
    """The debug check: slots inside their pools, receiver slots unique. Syncs with the host."""
    rc, sc = receiver_caches[0], sharer_caches[0] if sharer_caches else None
    valid = receiver_slots >= 0
    rs = receiver_slots[valid].long()
    r_cap = rc.shape[0] * rc.shape[1]
    if rs.numel() and int(rs.max()) >= r_cap:
        _fail(f"receiver_slots: slot {int(rs.max())} is out of range for a receiver pool of "
              f"{rc.shape[0]} pages x {rc.shape[1]} entries ({r_cap} slots)")
    if rs.unique().numel() != rs.numel():
        _fail("receiver_slots: a slot appears more than once; each fused token needs its own row")
    if sc is not None:
        ss = sharer_slots[valid].long()
        s_cap = sc.shape[0] * sc.shape[1]
        if ss.numel() and (int(ss.min()) < 0 or int(ss.max()) >= s_cap):
            bad = int(ss.min()) if int(ss.min()) < 0 else int(ss.max())
            _fail(f"sharer_slots: slot {bad} (for a non-padding token) is out of range [0, {s_cap}) "
                  f"for a sharer pool of {sc.shape[0]} pages x {sc.shape[1]} entries")


def _is_fake(t: Tensor) -> bool:
    return isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta"


def check_fuse_args(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers,
                    *, check_slots: bool = False) -> FuserWeights:
    w = check_weights(weights)
    r = len(receiver_caches)
    if len(sharer_caches) != r or len(fusers) != r:
        _fail(f"receiver_caches, sharer_caches and fusers must have one entry per fused cache: got "
              f"{r}, {len(sharer_caches)} and {len(fusers)}")
    p = w.num_fusers
    if fusers and not (0 <= min(fusers) and max(fusers) < p):
        i, f = next((i, f) for i, f in enumerate(fusers) if not 0 <= f < p)
        _fail(f"fusers[{i}] = {f} is out of range: the weights stack {p} fusers")
    _check_views("receiver_caches", receiver_caches, w.dtype, w.device, w.receiver_heads, w.receiver_width)
    _check_views("sharer_caches", sharer_caches, w.dtype, w.device, None, w.sharer_width)
    _check_slots("receiver_slots", receiver_slots, w.device)
    _check_slots("sharer_slots", sharer_slots, w.device)
    if sharer_slots.shape[0] != receiver_slots.shape[0]:
        _fail(f"sharer_slots: {sharer_slots.shape[0]} slots, expected one per receiver slot "
              f"({receiver_slots.shape[0]})")
    if r and not _is_fake(receiver_caches[0]):
        _check_distinct("receiver_caches", receiver_caches)
        if check_slots:
            check_slot_ranges(receiver_caches, sharer_caches, receiver_slots, sharer_slots)
    return w


def check_merge_args(receiver_caches, receiver_slots, projections, head_scales, *, check_slots=False) -> int:
    r = len(receiver_caches)
    if r == 0:
        return 0
    if len(projections) % r or len(head_scales) != len(projections):
        _fail(f"projections and head_scales: expected S * {r} entries each (S sharers per receiver "
              f"entry), got {len(projections)} and {len(head_scales)}")
    rc0 = receiver_caches[0]
    if not isinstance(rc0, Tensor) or rc0.dim() != 4:
        _fail("receiver_caches[0]: expected a 4-D [page, entry, head, dim] view")
    ht, dt = rc0.shape[2], rc0.shape[3]
    if rc0.dtype not in CACHE_DTYPES:
        _fail(f"receiver_caches[0]: dtype {rc0.dtype} is not supported (expected one of {list(CACHE_DTYPES)})")
    _check_views("receiver_caches", receiver_caches, rc0.dtype, rc0.device, ht, ht * dt)
    _check_slots("receiver_slots", receiver_slots, rc0.device)
    t = receiver_slots.shape[0]
    for i, (p, a) in enumerate(zip(projections, head_scales)):
        if tuple(p.shape) != (t, ht * dt) or p.device != rc0.device:
            _fail(f"projections[{i}]: expected [{t}, {ht * dt}] on {rc0.device}, got {list(p.shape)} on {p.device}")
        if tuple(a.shape) != (t, ht) or a.device != rc0.device:
            _fail(f"head_scales[{i}]: expected [{t}, {ht}] on {rc0.device}, got {list(a.shape)} on {a.device}")
        if p.dtype != torch.float32 or a.dtype != torch.float32:
            _fail(f"projections[{i}]/head_scales[{i}]: expected float32 (as c2c::project returns), "
                  f"got {p.dtype}/{a.dtype}")
    if not _is_fake(rc0):
        _check_distinct("receiver_caches", receiver_caches)
        if check_slots:
            check_slot_ranges(receiver_caches, [], receiver_slots, None)
    return len(projections) // r


# ---- the ops ---------------------------------------------------------------------------------
# Defined with a schema and registered with torch.library.Library rather than the
# ``custom_op`` decorator: the same op to the dispatcher, opcheck and torch.compile, at about a
# third of the per-call host cost (measured ~40 vs ~170 us for a 48-entry call).

_LIB = torch.library.Library("c2c", "DEF")
_LIB.define(
    "fuse(Tensor(a!)[] receiver_caches, Tensor[] sharer_caches, Tensor receiver_slots, Tensor sharer_slots, "
    "Tensor[] weights, int[] fusers, str backend='auto', bool check_slots=False) -> ()")
_LIB.define(
    "project(Tensor[] receiver_caches, Tensor[] sharer_caches, Tensor receiver_slots, Tensor sharer_slots, "
    "Tensor[] weights, int[] fusers, str backend='auto', bool check_slots=False) -> (Tensor, Tensor)")
_LIB.define(
    "merge(Tensor(a!)[] receiver_caches, Tensor receiver_slots, Tensor[] projections, Tensor[] head_scales, "
    "str backend='auto', bool check_slots=False) -> ()")


def _fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, backend="auto",
          check_slots=False) -> None:
    w = check_fuse_args(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers,
                        check_slots=check_slots)
    if receiver_caches and receiver_slots.numel():
        backends.resolve(backend, w.device).fuse(
            receiver_caches, sharer_caches, receiver_slots, sharer_slots, w, list(fusers))


def _fuse_fake(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers,
               backend="auto", check_slots=False) -> None:
    check_fuse_args(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers)


def _project(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, backend="auto",
             check_slots=False):
    w = check_fuse_args(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers,
                        check_slots=check_slots)
    module = backends.resolve(backend, w.device)
    project = getattr(module, "project", None) or backends.resolve("reference", w.device).project
    return project(receiver_caches, sharer_caches, receiver_slots, sharer_slots, w, list(fusers))


def _project_fake(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers,
                  backend="auto", check_slots=False):
    w = check_fuse_args(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers)
    t, r = receiver_slots.shape[0], len(fusers)
    return (receiver_slots.new_empty((r, t, w.receiver_width), dtype=torch.float32),
            receiver_slots.new_empty((r, t, w.receiver_heads), dtype=torch.float32))


def _merge(receiver_caches, receiver_slots, projections, head_scales, backend="auto", check_slots=False) -> None:
    check_merge_args(receiver_caches, receiver_slots, projections, head_scales, check_slots=check_slots)
    if receiver_caches and receiver_slots.numel():
        module = backends.resolve(backend, receiver_caches[0].device)
        merge = getattr(module, "merge", None) or backends.resolve("reference", receiver_slots.device).merge
        merge(receiver_caches, receiver_slots, projections, head_scales)


def _merge_fake(receiver_caches, receiver_slots, projections, head_scales, backend="auto", check_slots=False):
    check_merge_args(receiver_caches, receiver_slots, projections, head_scales)


for _name, _impl, _fake in (("fuse", _fuse, _fuse_fake), ("project", _project, _project_fake),
                            ("merge", _merge, _merge_fake)):
    # CompositeExplicitAutograd: one Python kernel for every device; backends dispatch on their own.
    _LIB.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"c2c::{_name}", _fake, lib=_LIB)
