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

Host cost: what the checks read from the cache views and weights is fingerprinted in one
native call (``c2c_kernels._C.fingerprint``) and the outcome kept per fingerprint, so a call on
views already checked re-checks only its slots; and :func:`call_fuse` / :func:`call_project` /
:func:`call_merge` (what :mod:`c2c_kernels.api` calls) run the op's implementation directly when
nothing needs the dispatcher (eager, plain tensors, no mode, tracer, profiler or autograd).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import aliasing, backends, compat, slots, status
from . import weights as schema
from .weights import FuserWeights

CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SLOT_DTYPES = (torch.int32, torch.int64)


# ---- checks ----------------------------------------------------------------------------------

def _fail(msg: str):
    raise ValueError(msg)


# ---- the check cache -------------------------------------------------------------------------
# The checks of the views and weights are pure functions of what the fingerprint describes (per
# tensor: dtype, device, sizes, strides, address, storage and its size; the fuser indices), so a
# fingerprint equal to one that passed passes again, whatever objects carry it: nothing is
# trusted by identity. Only fingerprints are kept (never tensors, so no memory is held alive).

def _native_helpers():
    try:
        from . import _C
    except ImportError:  # not built: every call takes the full checks and the dispatcher
        return None, None
    return getattr(_C, "fingerprint", None), getattr(_C, "dispatch_is_plain", None)


_fingerprint, _dispatch_is_plain = _native_helpers()


class _CheckCache:
    """Fingerprints of arguments that passed the view and weight checks -> what the checks found."""

    def __init__(self, size: int = 64):
        self.size, self.entries = size, {}

    def get(self, key):
        """The checks' finding for ``key`` (``(hash, description)`` or None), else None."""
        if key is None:
            return None
        hit = self.entries.get(key[0])
        return hit[1] if hit is not None and hit[0] == key[1] else None

    def put(self, key, found) -> None:
        if key is not None:
            if len(self.entries) >= self.size:
                self.entries.clear()  # bounded, and safe against a concurrent put
            self.entries[key[0]] = (key[1], found)


_FUSE_CHECKED = _CheckCache()   # fuse and project: found = whether sharer views overlap receiver views
_MERGE_CHECKED = _CheckCache()  # merge: found = True


def clear_check_cache() -> None:
    """Forget every checked fingerprint (the next calls run every check)."""
    _FUSE_CHECKED.entries.clear()
    _MERGE_CHECKED.entries.clear()


def _fuse_key(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, check_slots):
    if _fingerprint is None or check_slots:
        return None
    return _fingerprint((weights, receiver_caches, sharer_caches), fusers, (receiver_slots, sharer_slots))


def _merge_key(receiver_caches, receiver_slots, projections, head_scales, check_slots):
    if _fingerprint is None or check_slots:
        return None
    return _fingerprint((receiver_caches,), (), (receiver_slots, *projections, *head_scales))


def check_weights(weights: Sequence[Tensor]) -> FuserWeights:
    if len(weights) != len(FuserWeights._fields):
        _fail(f"weights: expected the {len(FuserWeights._fields)} stacked tensors of FuserWeights "
              f"{FuserWeights._fields}, got {len(weights)}")
    w = FuserWeights(*weights)
    # The shapes and dtypes come from the schema (c2c_kernels.weights.FIELDS): first the ranks
    # of the tensors the dimensions are read from, then every stack against them.
    for i, rank in schema.DIM_RANKS:
        if w[i].dim() != rank:
            name = schema.FIELDS[i].name
            _fail(f"weights.{name}: expected [{', '.join(schema.DIMS[s].name for s in schema.FIELD_SHAPES[name])}], "
                  f"got {list(w[i].shape)}")
    sizes = tuple([w[i].shape[axis] for i, axis in schema.DIM_AT])  # in schema.DIMS order
    dtype, device = w.w_in_sharer.dtype, w.w_in_sharer.device
    if dtype not in CACHE_DTYPES:
        _fail(f"weights: dtype {dtype} is not supported (expected one of {list(CACHE_DTYPES)})")
    for f, t, shape in zip(schema.FIELDS, w, schema.stack_shapes(sizes)):
        if t.shape != shape:
            _fail(f"weights.{f.name}: expected shape {list(shape)}, got {list(t.shape)}")
        if t.device != device:
            _fail(f"weights.{f.name}: on {t.device}, expected {device} like the other weights")
        want = torch.float32 if f.fp32 else dtype
        if t.dtype != want:
            _fail(f"weights.{f.name}: dtype {t.dtype}, expected {want}")
    dims = dict(zip(schema.DIMS, sizes))
    nb, ht, kt = dims["B"], dims["Ht"], dims["Kt"]
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


def _check_pool(name: str, view: Tensor) -> None:
    if view.shape[0] == 0 or view.shape[1] == 0:
        _fail(f"{name}: an empty pool ({view.shape[0]} pages x {view.shape[1]} entries per page); "
              f"a pool needs at least one page and a page size >= 1")


def _check_inside_storage(name: str, views: Sequence[Tensor]) -> None:
    i = aliasing.outside_storage(views)
    if i is not None:
        v = views[i]
        _fail(f"{name}[{i}]: the view (offset {v.storage_offset()}, shape {list(v.shape)}, strides "
              f"{list(v.stride())}) reaches past the end of its storage ({v.untyped_storage().nbytes()} bytes): "
              f"was the storage resized after the view was made?")


def _check_receivers_disjoint(name: str, views: Sequence[Tensor]):
    """Receiver views are written: no view may alias itself (e.g. expanded, stride 0) and no two
    may share memory, or one entry would read rows another has already written. Returns the
    views' extents for the sharer overlap test."""
    ext = aliasing._Extents(views)
    i = aliasing.self_aliasing(views, ext)
    if i is not None:
        v = views[i]
        _fail(f"{name}[{i}]: shape {list(v.shape)} with strides {list(v.stride())} makes different rows "
              f"share memory (an expanded or overlapping view); each written row needs its own memory")
    pair = aliasing.first_overlap(views, ext) if len(views) > 1 else None
    if pair is not None:
        i, j = pair
        _fail(f"{name}[{j}] shares memory with {name}[{i}]; each entry must write its own rows (for K and V "
              f"of a layer pass two views of distinct memory)")
    return ext


def check_slot_ranges(receiver_caches, sharer_caches, receiver_slots, sharer_slots) -> None:
    """The debug check: errors recorded on the device by earlier calls, slots inside their pools,
    receiver slots unique. Syncs with the host."""
    status.raise_pending_errors(receiver_slots.device)
    rows_r = slots.rows(receiver_caches[0])
    rows_s = slots.rows(sharer_caches[0]) if sharer_caches else 0
    _, _, errors = slots.prepare(receiver_slots, sharer_slots, rows_r, rows_s, dedupe=False)
    slots.raise_first(errors)
    rs = receiver_slots[receiver_slots >= 0]
    if rs.unique().numel() != rs.numel():
        _fail("receiver_slots: a slot appears more than once (check_slots=True rejects duplicates; without it "
              "the last token with that slot is written)")


def _is_fake(t: Tensor) -> bool:
    return isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta"


def check_fuse_args(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers,
                    *, check_slots: bool = False) -> FuserWeights:
    """Every documented check of c2c::fuse / c2c::project; returns the weights as FuserWeights."""
    key = _fuse_key(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, check_slots)
    return _check_fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers,
                       check_slots, key)[0]


def _check_call_slots(receiver_slots, sharer_slots, device) -> None:
    """The checks that depend on the slots (new every call, so never cached)."""
    _check_slots("receiver_slots", receiver_slots, device)
    _check_slots("sharer_slots", sharer_slots, device)
    if sharer_slots.shape[0] != receiver_slots.shape[0]:
        _fail(f"sharer_slots: {sharer_slots.shape[0]} slots, expected one per receiver slot "
              f"({receiver_slots.shape[0]})")


def _check_fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, check_slots, key):
    """``(weights, sharers_overlap)``: the checks, and whether a sharer view shares memory with a
    receiver view (then corrections must all be computed before any row is written). ``key``:
    the arguments' fingerprint (:func:`_fuse_key`); when it passed before, only the slots are
    checked (the rest would give the same answer)."""
    overlap = _FUSE_CHECKED.get(key)
    if overlap is not None:
        w = FuserWeights(*weights)
        _check_call_slots(receiver_slots, sharer_slots, w.device)
        return w, overlap
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
    _check_call_slots(receiver_slots, sharer_slots, w.device)
    if r:
        _check_pool("receiver_caches[0]", receiver_caches[0])
        _check_pool("sharer_caches[0]", sharer_caches[0])
    overlap = False
    if r and not _is_fake(receiver_caches[0]):
        _check_inside_storage("receiver_caches", receiver_caches)
        _check_inside_storage("sharer_caches", sharer_caches)
        ext = _check_receivers_disjoint("receiver_caches", receiver_caches)
        overlap = aliasing.any_cross_overlap(sharer_caches, receiver_caches, ext)
        if check_slots:
            check_slot_ranges(receiver_caches, sharer_caches, receiver_slots, sharer_slots)
    _FUSE_CHECKED.put(key, overlap)
    return w, overlap


def check_merge_args(receiver_caches, receiver_slots, projections, head_scales, *, check_slots=False) -> int:
    key = _merge_key(receiver_caches, receiver_slots, projections, head_scales, check_slots)
    return _check_merge(receiver_caches, receiver_slots, projections, head_scales, check_slots, key)


def _check_merge(receiver_caches, receiver_slots, projections, head_scales, check_slots, key) -> int:
    """The checks of c2c::merge; returns S. ``key`` as in :func:`_check_fuse` (the receiver views)."""
    r = len(receiver_caches)
    if r == 0:
        return 0
    if len(projections) % r or len(head_scales) != len(projections):
        _fail(f"projections and head_scales: expected S * {r} entries each (S sharers per receiver "
              f"entry), got {len(projections)} and {len(head_scales)}")
    rc0 = receiver_caches[0]
    checked = _MERGE_CHECKED.get(key)
    if not checked:
        if not isinstance(rc0, Tensor) or rc0.dim() != 4:
            _fail("receiver_caches[0]: expected a 4-D [page, entry, head, dim] view")
        if rc0.dtype not in CACHE_DTYPES:
            _fail(f"receiver_caches[0]: dtype {rc0.dtype} is not supported (expected one of {list(CACHE_DTYPES)})")
        ht, dt = rc0.shape[2], rc0.shape[3]
        _check_views("receiver_caches", receiver_caches, rc0.dtype, rc0.device, ht, ht * dt)
    ht, dt = rc0.shape[2], rc0.shape[3]
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
    if not checked:
        _check_pool("receiver_caches[0]", rc0)
        if not _is_fake(rc0):
            _check_inside_storage("receiver_caches", receiver_caches)
            _check_receivers_disjoint("receiver_caches", receiver_caches)
            if check_slots:
                check_slot_ranges(receiver_caches, [], receiver_slots, None)
        _MERGE_CHECKED.put(key, True)
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
    key = _fuse_key(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, check_slots)
    _run_fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, backend, check_slots, key)


def _run_fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, backend, check_slots,
              key) -> None:
    w, overlap = _check_fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers,
                             check_slots, key)
    if receiver_caches and receiver_slots.numel():
        module = backends.resolve(backend, w.device)
        if overlap:
            # A sharer view shares memory with a receiver view: every entry must still read the
            # rows as they were when the call began, so compute every correction first, then write.
            projection, head_scale = _backend_project(module, w.device)(
                receiver_caches, sharer_caches, receiver_slots, sharer_slots, w, list(fusers))
            _backend_merge(module, w.device)(receiver_caches, receiver_slots, list(projection.unbind(0)),
                                             list(head_scale.unbind(0)))
            return
        module.fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, w, list(fusers))


def _backend_project(module, device):
    return getattr(module, "project", None) or backends.resolve("reference", device).project


def _backend_merge(module, device):
    return getattr(module, "merge", None) or backends.resolve("reference", device).merge


def _fuse_fake(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers,
               backend="auto", check_slots=False) -> None:
    compat.refuse_inductor_on_broken_torch(torch.ops.c2c.fuse.default)
    check_fuse_args(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers)


def _project(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, backend="auto",
             check_slots=False):
    key = _fuse_key(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, check_slots)
    return _run_project(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, backend,
                        check_slots, key)


def _run_project(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, backend,
                 check_slots, key):
    w, _ = _check_fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers,
                       check_slots, key)
    project = _backend_project(backends.resolve(backend, w.device), w.device)
    return project(receiver_caches, sharer_caches, receiver_slots, sharer_slots, w, list(fusers))


def _project_fake(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers,
                  backend="auto", check_slots=False):
    w = check_fuse_args(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers)
    return _project_outputs(receiver_slots, w, len(fusers))


def _project_outputs(receiver_slots, w: FuserWeights, r: int):
    t = receiver_slots.shape[0]
    return (receiver_slots.new_empty((r, t, w.receiver_width), dtype=torch.float32),
            receiver_slots.new_empty((r, t, w.receiver_heads), dtype=torch.float32))


def _merge(receiver_caches, receiver_slots, projections, head_scales, backend="auto", check_slots=False) -> None:
    key = _merge_key(receiver_caches, receiver_slots, projections, head_scales, check_slots)
    _run_merge(receiver_caches, receiver_slots, projections, head_scales, backend, check_slots, key)


def _run_merge(receiver_caches, receiver_slots, projections, head_scales, backend, check_slots, key) -> None:
    _check_merge(receiver_caches, receiver_slots, projections, head_scales, check_slots, key)
    if receiver_caches and receiver_slots.numel():
        device = receiver_caches[0].device
        merge = _backend_merge(backends.resolve(backend, device), device)
        merge(receiver_caches, receiver_slots, projections, head_scales)


def _merge_fake(receiver_caches, receiver_slots, projections, head_scales, backend="auto", check_slots=False):
    compat.refuse_inductor_on_broken_torch(torch.ops.c2c.merge.default)
    check_merge_args(receiver_caches, receiver_slots, projections, head_scales)


# ---- calling the ops -------------------------------------------------------------------------
# Going through the dispatcher costs ~30 us for a 48-entry call (it converts every list to C++
# and back) and, in plain eager code, does nothing else for these ops: they have no autograd
# formula and one Python kernel for every device. So the Python API calls the checked
# implementation directly when the dispatcher could not do anything different: not tracing or
# compiling, no torch function or dispatch mode, functorch transform or profiler active, and
# every tensor a plain dense CPU/CUDA/meta tensor that does not require grad (the fingerprint
# is None otherwise). Everything else (torch.compile, opcheck, fake and functional tensors)
# goes through the registered ops as before.

def _direct(backend, check_slots) -> bool:
    """Whether an eager call may skip the dispatcher (the tensors are checked by the fingerprint)."""
    return not (torch.compiler.is_compiling() or _fingerprint is None or check_slots
                or type(backend) is not str or torch._C._is_torch_function_mode_enabled()
                or torch._C._autograd._profiler_enabled() or not _dispatch_is_plain())


def call_fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, backend="auto",
              check_slots=False) -> None:
    """``torch.ops.c2c.fuse(...)`` at the least host cost (see above); the same checks and result."""
    if _direct(backend, check_slots):
        key = _fuse_key(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, False)
        if key is not None:
            receiver_caches, sharer_caches = list(receiver_caches), list(sharer_caches)
            if receiver_slots.device.type == "meta":  # the meta kernel's work: the checks
                _check_fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, False, key)
                return
            _run_fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, backend,
                      False, key)
            return
    torch.ops.c2c.fuse(list(receiver_caches), list(sharer_caches), receiver_slots, sharer_slots, list(weights),
                       list(fusers), backend, check_slots)


def call_project(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, backend="auto",
                 check_slots=False):
    """``torch.ops.c2c.project(...)`` at the least host cost."""
    if _direct(backend, check_slots):
        key = _fuse_key(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers, False)
        if key is not None:
            receiver_caches, sharer_caches = list(receiver_caches), list(sharer_caches)
            if receiver_slots.device.type == "meta":
                w, _ = _check_fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers,
                                   False, key)
                return _project_outputs(receiver_slots, w, len(fusers))
            return _run_project(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers,
                                backend, False, key)
    return torch.ops.c2c.project(list(receiver_caches), list(sharer_caches), receiver_slots, sharer_slots,
                                 list(weights), list(fusers), backend, check_slots)


def call_merge(receiver_caches, receiver_slots, projections, head_scales, backend="auto", check_slots=False) -> None:
    """``torch.ops.c2c.merge(...)`` at the least host cost."""
    if _direct(backend, check_slots):
        projections, head_scales = list(projections), list(head_scales)
        key = _merge_key(receiver_caches, receiver_slots, projections, head_scales, False)
        if key is not None:
            receiver_caches = list(receiver_caches)
            if receiver_slots.device.type == "meta":
                _check_merge(receiver_caches, receiver_slots, projections, head_scales, False, key)
                return
            _run_merge(receiver_caches, receiver_slots, projections, head_scales, backend, False, key)
            return
    torch.ops.c2c.merge(list(receiver_caches), receiver_slots, list(projections), list(head_scales), backend,
                        check_slots)


for _name, _impl, _fake in (("fuse", _fuse, _fuse_fake), ("project", _project, _project_fake),
                            ("merge", _merge, _merge_fake)):
    # CompositeExplicitAutograd: one Python kernel for every device; backends dispatch on their own.
    _LIB.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"c2c::{_name}", _fake, lib=_LIB)
