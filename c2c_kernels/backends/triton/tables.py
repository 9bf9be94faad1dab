"""Device tables that let one launch reach many cache tensors.

Every entry of a call has its own cache view (its own base address and, possibly, strides), so
the two cache-touching stages cannot take the views as kernel arguments. They read an int64
table instead, one row per entry (layout in ``_common.py``), and cast the stored address back
to a pointer on the device.

The table depends only on the views' addresses and strides (and the fuser indices), so it is
built once per distinct set and kept: a repeated call, or a CUDA-graph replay, launches with the
cached device tensor and does no host-to-device copy. The first call with a new set copies a
few hundred bytes from pinned memory with ``non_blocking``. A table holds only addresses, so a
stale entry (freed and reused memory) is still exactly right for whatever now lives there.

The tables hold no slots: those change from call to call (and from replay to replay of a CUDA
graph), so the prepared slots (slot_prep.py) reach the kernels as arguments, never through a
cached table.

CUDA graphs: a captured launch keeps reading the table's device memory at every replay, so a
table used during a capture is never evicted. Building one during a capture is refused with a
clear error (like the autotuner, the tables need one eager warm-up call before capturing).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch

from ._common import ENTRY_WIDTH

MAX_TABLES = 64
_tables: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (device table, host copy, extra)
_captured: dict[tuple, tuple] = {}  # referenced by CUDA graphs: kept for good


class EntryTable(NamedTuple):
    rows: torch.Tensor  # [R, ENTRY_WIDTH] int64 on the caches' device
    receiver_vec: int  # see vector_width
    sharer_vec: int


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _cached(key: tuple, device: torch.device, build) -> tuple:
    """``(device table, extra)`` for ``key``; ``build()`` gives ``(rows, width, extra)`` on a miss."""
    if key in _captured:
        return _captured[key]
    hit = _tables.get(key)
    if _capturing(device):
        if hit is None:
            raise RuntimeError(
                "the triton backend met new cache tensors during CUDA graph capture: run the same "
                "call once before capturing so that its pointer table (and autotuning) is ready")
        _captured[key] = (hit[0], hit[2])
        return _captured[key]
    if hit is not None:
        _tables.move_to_end(key)
        return hit[0], hit[2]
    rows, width, extra = build()
    host = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), width)
    if device.type == "cuda":
        host = host.pin_memory()
        table = host.to(device, non_blocking=True)
    else:
        table = host
    _tables[key] = (table, host, extra)  # the host copy must outlive an asynchronous upload
    if len(_tables) > MAX_TABLES:
        _tables.popitem(last=False)
    return table, extra


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
