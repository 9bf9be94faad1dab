"""Errors found on the device, reported later: the per-device slot status buffer.

GPU backends cannot raise from inside a kernel without a host sync, so a kernel that meets an
out-of-range slot skips that token (nothing read, nothing written) and records the first
offence in a small int64 buffer on the device. ``raise_pending_errors()`` (a host sync) and
every ``check_slots=True`` call raise it as a ``ValueError`` and clear it. CPU backends walk
the slots on the host anyway and raise at once, with nothing written.

Buffer layout (int64 [8]): ``[flag, argument, index, value, limit, 0, 0, 0]``; ``flag`` is set
from 0 to 1 by an atomic compare-and-swap, and only the thread that set it writes the rest.
``argument`` is :data:`RECEIVER_SLOTS` or :data:`SHARER_SLOTS`; ``limit`` is the pool's row
count (``pages * page_size``), so the valid range is ``[0, limit)``.
"""
from __future__ import annotations

import torch

RECEIVER_SLOTS = 1
SHARER_SLOTS = 2
ARGUMENTS = {RECEIVER_SLOTS: "receiver_slots", SHARER_SLOTS: "sharer_slots"}
SIZE = 8

_buffers: dict[torch.device, torch.Tensor] = {}


def buffer(device: torch.device | str) -> torch.Tensor:
    """The status buffer of ``device`` (created zeroed on first use; create it before a CUDA-graph
    capture, e.g. with one eager call, so the capture does not record its allocation)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    buf = _buffers.get(device)
    if buf is None:
        buf = _buffers[device] = torch.zeros(SIZE, dtype=torch.int64, device=device)
    return buf


def slot_error(argument: str, index: int, value: int, limit: int, *, later: bool = False) -> ValueError:
    """The one wording of an out-of-range slot, for every backend."""
    where = " (recorded on the device by an earlier call; that token was skipped)" if later else ""
    what = "receiver pool" if argument == "receiver_slots" else "sharer pool"
    pad = " for a non-padding token" if argument == "sharer_slots" else ""
    return ValueError(f"{argument}[{index}] = {value}{pad} is out of range [0, {limit}) for the {what} "
                      f"of {limit} rows{where}")


def raise_pending_errors(device: torch.device | str | None = None) -> None:
    """Raise (and clear) the first slot error a kernel recorded on ``device`` (every device that
    has a status buffer if ``None``). Synchronises with the device: call it outside hot loops,
    e.g. once per scheduler step in debug builds, or after a CUDA-graph replay."""
    devices = [torch.device(device)] if device is not None else list(_buffers)
    for d in devices:
        if d.type == "cuda" and d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
        buf = _buffers.get(d)
        if buf is None:
            continue
        flag, argument, index, value, limit = buf[:5].tolist()
        if flag:
            buf.zero_()
            raise slot_error(ARGUMENTS.get(argument, f"argument {argument}"), index, value, limit, later=True)


def clear(device: torch.device | str | None = None) -> None:
    """Forget recorded errors without raising (tests)."""
    for d, buf in _buffers.items():
        if device is None or d == torch.device(device):
            buf.zero_()
