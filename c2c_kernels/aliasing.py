"""Which cache views share memory: the cheap checks behind the op layer's view contract.

Every view is a strided ``[page, entry, head, dim]`` window into some storage. Two views may
interleave without sharing an element (FlashInfer's ``[pages, 2, ...]`` pools put K and V of
one page side by side), so comparing byte intervals alone would reject real layouts. Instead:

1. disjoint byte intervals: no shared memory (the common case, O(1) per pair);
2. otherwise, when both views have the same strides and each stride steps over everything the
   smaller strides span ("nested" strides, as every engine layout has), the element offsets
   are digits of a mixed-radix number, and whether the base offset difference is reachable by
   differences of indices is decided exactly, two candidates per dimension;
3. anything else is treated as overlapping (conservative: such views are never produced by
   :mod:`c2c_kernels.layouts`).
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor


def _dims(view: Tensor):
    """(stride, size) of the dims with size > 1, largest stride first (in elements)."""
    return sorted(((st, n) for st, n in zip(view.stride(), view.shape) if n > 1), reverse=True)


def _nested(dims) -> bool:
    span = 0
    for stride, size in reversed(dims):  # smallest stride first
        if stride <= span:
            return False
        span += (size - 1) * stride
    return True


def self_aliases(view: Tensor) -> bool:
    """True when two different indices of ``view`` may reach the same element (a stride-0
    expanded dim, or strides that do not nest)."""
    return not _nested(_dims(view))


def extent(view: Tensor) -> tuple[int, int]:
    """``[lo, hi)`` in bytes of the memory ``view`` reaches (views are non-empty here)."""
    es = view.element_size()
    lo = view.data_ptr()
    return lo, lo + (sum((n - 1) * st for st, n in zip(view.stride(), view.shape)) + 1) * es


def _reachable(delta: int, dims) -> bool:
    """Is ``delta == sum(j_i * stride_i)`` for some ``|j_i| < size_i``? (nested strides)"""
    if not dims:
        return delta == 0
    (stride, size), rest = dims[0], dims[1:]
    for j in {delta // stride, -(-delta // stride)}:
        if abs(j) < size and _reachable(delta - j * stride, rest):
            return True
    return False


def may_overlap(a: Tensor, b: Tensor, ext_a=None, ext_b=None) -> bool:
    """Whether views ``a`` and ``b`` may share an element (see the module docstring)."""
    lo_a, hi_a = ext_a or extent(a)
    lo_b, hi_b = ext_b or extent(b)
    if hi_a <= lo_b or hi_b <= lo_a:
        return False
    dims = _dims(a)
    if a.element_size() != b.element_size() or dims != _dims(b) or not _nested(dims):
        return True
    delta, rem = divmod(lo_b - lo_a, a.element_size())
    return rem != 0 or _reachable(delta, dims)


def outside_storage(views: Sequence[Tensor]) -> int | None:
    """Index of the first view that reaches past the end of its storage (the storage was resized
    smaller after the view was made, which torch does not check again), else ``None``. The
    views share one shape and dtype (the op layer checked that first)."""
    shape, es = views[0].shape, views[0].element_size()
    span_of = {}
    for i, v in enumerate(views):
        st = v.stride()
        span = span_of.get(st)
        if span is None:
            span = span_of[st] = (sum((n - 1) * x for x, n in zip(st, shape)) + 1) * es
        if v.storage_offset() * es + span > v.untyped_storage().nbytes():
            return i
    return None


class _Extents:
    """Byte extents of views of one pool geometry; per-stride work is done once per distinct
    stride tuple (a call's K and V views usually share one), so a view costs two attribute reads."""

    def __init__(self, views: Sequence[Tensor]):
        shape = views[0].shape
        es = views[0].element_size()
        per_stride = {}
        self.lo, self.hi, self.nested = [], [], []
        for v in views:
            st = v.stride()
            info = per_stride.get(st)
            if info is None:
                span = (sum((n - 1) * x for x, n in zip(st, shape)) + 1) * es if v.shape == shape else None
                info = per_stride[st] = (span, _nested(_dims(v)))
            span, nested = info
            lo = v.data_ptr()
            self.lo.append(lo)
            self.hi.append(lo + span if span is not None else extent(v)[1])
            self.nested.append(nested)


def self_aliasing(views: Sequence[Tensor], ext: "_Extents | None" = None) -> int | None:
    """Index of the first view that may alias itself, else ``None``."""
    ext = ext or _Extents(views)
    return next((i for i, ok in enumerate(ext.nested) if not ok), None)


def first_overlap(views: Sequence[Tensor], ext: "_Extents | None" = None) -> tuple[int, int] | None:
    """``(i, j)``, ``i < j``, of the first pair of views that may share memory, else ``None``."""
    ext = ext or _Extents(views)
    lo, hi = ext.lo, ext.hi
    order = sorted(range(len(views)), key=lo.__getitem__)
    found = None
    for pos, i in enumerate(order):
        for j in order[pos + 1:]:
            if lo[j] >= hi[i]:
                break
            if may_overlap(views[i], views[j], (lo[i], hi[i]), (lo[j], hi[j])):
                pair = (min(i, j), max(i, j))
                found = pair if found is None or pair < found else found
    return found


def any_cross_overlap(readers: Sequence[Tensor], writers: Sequence[Tensor], writer_ext: "_Extents | None" = None) -> bool:
    """Whether any of ``readers`` may share memory with any of ``writers``."""
    if not readers or not writers:
        return False
    r, w = _Extents(readers), writer_ext or _Extents(writers)
    if max(r.hi) <= min(w.lo) or max(w.hi) <= min(r.lo):
        return False
    events = sorted([(lo, 0, i) for i, lo in enumerate(r.lo)] + [(lo, 1, i) for i, lo in enumerate(w.lo)])
    for pos, (lo, kind, i) in enumerate(events):
        hi = (r if kind == 0 else w).hi[i]
        for lo2, kind2, k in events[pos + 1:]:
            if lo2 >= hi:
                break
            if kind2 != kind:
                a, b = (readers[i], writers[k]) if kind == 0 else (writers[i], readers[k])
                if may_overlap(a, b):
                    return True
    return False
