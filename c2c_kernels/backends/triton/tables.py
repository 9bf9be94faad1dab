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

CUDA graphs: a captured launch keeps reading the table's device memory at every replay, so a
table used during a capture is never evicted. Building one during a capture is refused with a
clear error (like the autotuner, the tables need one eager warm-up call before capturing).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ._common import ENTRY_WIDTH

MAX_TABLES = 64
_tables: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_captured: dict[tuple, torch.Tensor] = {}  # referenced by CUDA graphs: kept for good


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _upload(key: tuple, rows: list[list[int]], width: int, device: torch.device) -> torch.Tensor:
    if key in _captured:
        return _captured[key]
    hit = _tables.get(key)
    if _capturing(device):
        if hit is None:
            raise RuntimeError(
                "the triton backend met new cache tensors during CUDA graph capture: run the same "
                "call once before capturing so that its pointer table (and autotuning) is ready")
        _captured[key] = hit[0]
        return hit[0]
    if hit is not None:
        _tables.move_to_end(key)
        return hit[0]
    host = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), width)
    if device.type == "cuda":
        host = host.pin_memory()
        table = host.to(device, non_blocking=True)
    else:
        table = host
    _tables[key] = (table, host)  # the host copy must outlive an asynchronous upload
    if len(_tables) > MAX_TABLES:
        _tables.popitem(last=False)
    return table


def _view_row(view: torch.Tensor) -> list[int]:
    return [view.data_ptr(), view.stride(0), view.stride(1), view.stride(2)]


def entry_table(receiver_caches, sharer_caches, fusers) -> torch.Tensor:
    """``[R, ENTRY_WIDTH]``: fuser index, receiver view, sharer view of every entry."""
    rows = [[f, *_view_row(rc), *_view_row(sc)]
            for f, rc, sc in zip(fusers, receiver_caches, sharer_caches)]
    device = receiver_caches[0].device
    return _upload(("entry", device, *map(tuple, rows)), rows, ENTRY_WIDTH, device)


def merge_tables(receiver_caches, projections, head_scales) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R, 4]`` receiver views and ``[R*S, 6]`` contributions: (address, row stride, column
    stride) of each projection, then of its head scales."""
    device = receiver_caches[0].device
    views = [_view_row(rc) for rc in receiver_caches]
    parts = [[p.data_ptr(), p.stride(0), p.stride(1), a.data_ptr(), a.stride(0), a.stride(1)]
             for p, a in zip(projections, head_scales)]
    return (_upload(("receivers", device, *map(tuple, views)), views, 4, device),
            _upload(("contributions", device, *map(tuple, parts)), parts, 6, device))


def vector_width(views, element_size: int) -> int:
    """Elements per 16-byte access that every row of ``views`` allows (1 if any view is not
    16-byte aligned in base, strides or head dim). The kernels promise this to the compiler."""
    vec = 16 // element_size
    for v in views:
        strides = [v.stride(d) for d in range(3) if v.shape[d] > 1]  # unused strides are arbitrary
        if v.data_ptr() % 16 or any(s % vec for s in (*strides, v.shape[3])):
            return 1
    return vec
