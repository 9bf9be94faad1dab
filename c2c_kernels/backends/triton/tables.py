"""Device tables that let one launch reach many cache tensors.

Every entry of a call has its own cache view (its own base address and, possibly, strides), so
the two cache-touching stages cannot take the views as kernel arguments. They read an int64
table instead, one row per entry (layout in ``_common.py``), and cast the stored address back
to a pointer on the device.

The table depends only on the views' addresses and strides (and the fuser indices), so it is
built once per distinct set and kept: a repeated call, or a CUDA-graph replay, launches with the
cached device tensor. A table is written on the device by a few launches whose arguments carry
its values (_fill_kernel): no host-to-device copy and no pinned host buffer. A table holds only
addresses, so a stale entry (freed and reused memory) is still exactly right for whatever now
lives there.

The tables hold no slots: those change from call to call (and from replay to replay of a CUDA
graph), so the prepared slots (slot_prep.py) reach the kernels as arguments, never through a
cached table.

CUDA graphs: a captured launch keeps reading the table's device memory at every replay, so a
table used during a capture is never evicted. A table first met during a capture (new caches,
or the projections that ``c2c::project`` allocated in the same capture, as the parallel
multi-sharer mode does before its merge) is written by fill launches the graph records: every
replay rewrites it before the stages that read it. (The autotuner still needs one eager call
with the same shapes before capturing.)
"""
from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import ENTRY_WIDTH

# A table is written on the device by launches of this kernel, FILL values per launch, each value
# split into two non-negative int32 arguments (the high and low 31 bits: every argument has one
# type, so one binary serves every table). Kernel arguments are part of a captured CUDA graph:
# a table first met during a capture is written by the replay itself, with no host buffer to
# keep alive and no host-to-device copy (which a capture cannot take from pageable memory).
FILL = 64
_HALF = tl.constexpr(1 << 31)
_ARGS = [f"{half}{i}" for i in range(FILL) for half in "hl"]


@triton.jit(do_not_specialize=_ARGS)
def _fill_kernel(
    out_ptr,
    h0, l0, h1, l1, h2, l2, h3, l3, h4, l4, h5, l5, h6, l6, h7, l7, h8, l8, h9, l9, h10, l10, h11,
    l11, h12, l12, h13, l13, h14, l14, h15, l15, h16, l16, h17, l17, h18, l18, h19, l19, h20, l20,
    h21, l21, h22, l22, h23, l23, h24, l24, h25, l25, h26, l26, h27, l27, h28, l28, h29, l29, h30,
    l30, h31, l31, h32, l32, h33, l33, h34, l34, h35, l35, h36, l36, h37, l37, h38, l38, h39, l39,
    h40, l40, h41, l41, h42, l42, h43, l43, h44, l44, h45, l45, h46, l46, h47, l47, h48, l48, h49,
    l49, h50, l50, h51, l51, h52, l52, h53, l53, h54, l54, h55, l55, h56, l56, h57, l57, h58, l58,
    h59, l59, h60, l60, h61, l61, h62, l62, h63, l63,
):
    tl.store(out_ptr + 0, h0.to(tl.int64) * _HALF + l0)
    tl.store(out_ptr + 1, h1.to(tl.int64) * _HALF + l1)
    tl.store(out_ptr + 2, h2.to(tl.int64) * _HALF + l2)
    tl.store(out_ptr + 3, h3.to(tl.int64) * _HALF + l3)
    tl.store(out_ptr + 4, h4.to(tl.int64) * _HALF + l4)
    tl.store(out_ptr + 5, h5.to(tl.int64) * _HALF + l5)
    tl.store(out_ptr + 6, h6.to(tl.int64) * _HALF + l6)
    tl.store(out_ptr + 7, h7.to(tl.int64) * _HALF + l7)
    tl.store(out_ptr + 8, h8.to(tl.int64) * _HALF + l8)
    tl.store(out_ptr + 9, h9.to(tl.int64) * _HALF + l9)
    tl.store(out_ptr + 10, h10.to(tl.int64) * _HALF + l10)
    tl.store(out_ptr + 11, h11.to(tl.int64) * _HALF + l11)
    tl.store(out_ptr + 12, h12.to(tl.int64) * _HALF + l12)
    tl.store(out_ptr + 13, h13.to(tl.int64) * _HALF + l13)
    tl.store(out_ptr + 14, h14.to(tl.int64) * _HALF + l14)
    tl.store(out_ptr + 15, h15.to(tl.int64) * _HALF + l15)
    tl.store(out_ptr + 16, h16.to(tl.int64) * _HALF + l16)
    tl.store(out_ptr + 17, h17.to(tl.int64) * _HALF + l17)
    tl.store(out_ptr + 18, h18.to(tl.int64) * _HALF + l18)
    tl.store(out_ptr + 19, h19.to(tl.int64) * _HALF + l19)
    tl.store(out_ptr + 20, h20.to(tl.int64) * _HALF + l20)
    tl.store(out_ptr + 21, h21.to(tl.int64) * _HALF + l21)
    tl.store(out_ptr + 22, h22.to(tl.int64) * _HALF + l22)
    tl.store(out_ptr + 23, h23.to(tl.int64) * _HALF + l23)
    tl.store(out_ptr + 24, h24.to(tl.int64) * _HALF + l24)
    tl.store(out_ptr + 25, h25.to(tl.int64) * _HALF + l25)
    tl.store(out_ptr + 26, h26.to(tl.int64) * _HALF + l26)
    tl.store(out_ptr + 27, h27.to(tl.int64) * _HALF + l27)
    tl.store(out_ptr + 28, h28.to(tl.int64) * _HALF + l28)
    tl.store(out_ptr + 29, h29.to(tl.int64) * _HALF + l29)
    tl.store(out_ptr + 30, h30.to(tl.int64) * _HALF + l30)
    tl.store(out_ptr + 31, h31.to(tl.int64) * _HALF + l31)
    tl.store(out_ptr + 32, h32.to(tl.int64) * _HALF + l32)
    tl.store(out_ptr + 33, h33.to(tl.int64) * _HALF + l33)
    tl.store(out_ptr + 34, h34.to(tl.int64) * _HALF + l34)
    tl.store(out_ptr + 35, h35.to(tl.int64) * _HALF + l35)
    tl.store(out_ptr + 36, h36.to(tl.int64) * _HALF + l36)
    tl.store(out_ptr + 37, h37.to(tl.int64) * _HALF + l37)
    tl.store(out_ptr + 38, h38.to(tl.int64) * _HALF + l38)
    tl.store(out_ptr + 39, h39.to(tl.int64) * _HALF + l39)
    tl.store(out_ptr + 40, h40.to(tl.int64) * _HALF + l40)
    tl.store(out_ptr + 41, h41.to(tl.int64) * _HALF + l41)
    tl.store(out_ptr + 42, h42.to(tl.int64) * _HALF + l42)
    tl.store(out_ptr + 43, h43.to(tl.int64) * _HALF + l43)
    tl.store(out_ptr + 44, h44.to(tl.int64) * _HALF + l44)
    tl.store(out_ptr + 45, h45.to(tl.int64) * _HALF + l45)
    tl.store(out_ptr + 46, h46.to(tl.int64) * _HALF + l46)
    tl.store(out_ptr + 47, h47.to(tl.int64) * _HALF + l47)
    tl.store(out_ptr + 48, h48.to(tl.int64) * _HALF + l48)
    tl.store(out_ptr + 49, h49.to(tl.int64) * _HALF + l49)
    tl.store(out_ptr + 50, h50.to(tl.int64) * _HALF + l50)
    tl.store(out_ptr + 51, h51.to(tl.int64) * _HALF + l51)
    tl.store(out_ptr + 52, h52.to(tl.int64) * _HALF + l52)
    tl.store(out_ptr + 53, h53.to(tl.int64) * _HALF + l53)
    tl.store(out_ptr + 54, h54.to(tl.int64) * _HALF + l54)
    tl.store(out_ptr + 55, h55.to(tl.int64) * _HALF + l55)
    tl.store(out_ptr + 56, h56.to(tl.int64) * _HALF + l56)
    tl.store(out_ptr + 57, h57.to(tl.int64) * _HALF + l57)
    tl.store(out_ptr + 58, h58.to(tl.int64) * _HALF + l58)
    tl.store(out_ptr + 59, h59.to(tl.int64) * _HALF + l59)
    tl.store(out_ptr + 60, h60.to(tl.int64) * _HALF + l60)
    tl.store(out_ptr + 61, h61.to(tl.int64) * _HALF + l61)
    tl.store(out_ptr + 62, h62.to(tl.int64) * _HALF + l62)
    tl.store(out_ptr + 63, h63.to(tl.int64) * _HALF + l63)


MAX_TABLES = 64
_tables: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (device table, extra)
_captured: dict[tuple, tuple] = {}  # referenced by CUDA graphs: kept for good
_pending: dict[tuple, list] = {}  # written inside a capture: its values reach memory at replay only


class EntryTable(NamedTuple):
    rows: torch.Tensor  # [R, ENTRY_WIDTH] int64 on the caches' device
    receiver_vec: int  # see vector_width
    sharer_vec: int


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _write(flat: torch.Tensor, values: list) -> None:
    """``flat[:len(values)] = values`` by FILL-value launches of _fill_kernel (``flat`` padded)."""
    for start in range(0, len(values), FILL):
        chunk = values[start:start + FILL]
        args = []
        for v in chunk + [0] * (FILL - len(chunk)):
            if not 0 <= v < 1 << 62:
                raise ValueError(f"table value {v} is outside [0, 2^62): a negative stride or address?")
            args += (v >> 31, v & 0x7FFFFFFF)
        _fill_kernel[(1,)](flat[start:], *args)


def _cached(key: tuple, device: torch.device, build) -> tuple:
    """``(device table, extra)`` for ``key``; ``build()`` gives ``(rows, width, extra)`` on a miss.

    A table first met during a CUDA graph capture (the projections of ``c2c::project`` called in
    the same capture live at addresses the eager warm-up never saw) is written by launches that
    the capture records, so the graph rewrites it at every replay, and is kept for good."""
    capturing = _capturing(device)
    if key in _captured:
        table, extra = _captured[key]
        if not capturing and key in _pending:  # used eagerly before any replay wrote it
            # (the view's storage is padded to whole FILL launches, as _write needs)
            _write(table.view(-1), _pending.pop(key))
        return table, extra
    hit = _tables.get(key)
    if hit is None:
        rows, width, extra = build()
        values = [v for row in rows for v in row]
        flat = torch.empty(-(-len(values) // FILL) * FILL, dtype=torch.int64, device=device)
        _write(flat, values)
        hit = (flat[:len(values)].view(len(rows), width), extra)
        if capturing:
            _pending[key] = values
        else:
            _tables[key] = hit
            if len(_tables) > MAX_TABLES:
                _tables.popitem(last=False)  # launches already queued with it stay stream-ordered
    elif not capturing:
        _tables.move_to_end(key)
    if capturing:
        _captured[key] = hit
    return hit


def _addresses(views) -> tuple:
    return tuple([(v.data_ptr(), v.stride()) for v in views])


def entry_table(receiver_caches, sharer_caches, fusers) -> EntryTable:
    """Fuser index, receiver view and sharer view of every entry (all receiver views share one
    shape, all sharer views another: ops.py checks it)."""
    receivers, sharers = _addresses(receiver_caches), _addresses(sharer_caches)
    r_shape, s_shape = receiver_caches[0].shape, sharer_caches[0].shape
    size = receiver_caches[0].element_size()
    device = receiver_caches[0].device

    def build():
        rows = [[f, rp, *rs[:3], sp, *ss[:3]] for f, (rp, rs), (sp, ss) in zip(fusers, receivers, sharers)]
        vecs = (vector_width(receivers, r_shape, size), vector_width(sharers, s_shape, size))
        return rows, ENTRY_WIDTH.value, vecs

    key = ("entry", device, size, r_shape, s_shape, tuple(fusers), receivers, sharers)
    table, (receiver_vec, sharer_vec) = _cached(key, device, build)
    return EntryTable(table, receiver_vec, sharer_vec)


def merge_tables(receiver_caches, projections, head_scales) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``[R, 4]`` receiver views (address, page, entry and head strides), ``[R*S, 6]``
    contributions (address, row stride, column stride of each projection, then of its head
    scales), and the receiver views' vector width."""
    receivers = _addresses(receiver_caches)
    first = receiver_caches[0]
    shape, size, device = first.shape, first.element_size(), first.device
    receiver_table, vec = _cached(
        ("receivers", device, size, shape, receivers), device,
        lambda: ([[p, *s[:3]] for p, s in receivers], 4, vector_width(receivers, shape, size)))
    parts = tuple([(p.data_ptr(), *p.stride(), a.data_ptr(), *a.stride())
                   for p, a in zip(projections, head_scales)])
    contribution_table, _ = _cached(("contributions", device, parts), device, lambda: (list(parts), 6, None))
    return receiver_table, contribution_table, vec


def vector_width(addresses, shape, element_size: int) -> int:
    """Elements per 16-byte access that every row of the views at ``addresses`` (``(data_ptr,
    strides)`` pairs) of ``shape`` allows: 1 unless every base, used stride and the head dim
    are 16-byte multiples. The kernels promise this alignment to the compiler."""
    vec = 16 // element_size
    if shape[3] % vec:
        return 1
    used = [d for d in range(3) if shape[d] > 1]  # the stride of a size-1 dim is arbitrary
    for ptr, strides in addresses:
        if ptr % 16 or any(strides[d] % vec for d in used):
            return 1
    return vec
