"""Scratch memory of the backends, and the debug mode that poisons it.

With ``C2C_POISON_WORKSPACES=1`` (the test suite sets it) every workspace a backend allocates
is filled before use with NaN (floating point) or ``POISON_INT`` (integers), so a kernel that
reads memory it has not written (a GEMM output accumulated into before it was written, a tile
read past the rows it filled) corrupts the result on every machine, not only where the
allocator happens to hand back garbage. The native CPU backend reads the same variable.
"""
from __future__ import annotations

import os

import torch

POISON_INT = 0x5A5A5A5A  # far out of any pool: a poisoned slot that is used faults (ASan) instead of reading as padding
_poison = os.environ.get("C2C_POISON_WORKSPACES", "0") == "1"


def poisoning() -> bool:
    return _poison


def set_poisoning(on: bool) -> None:
    """Switch poisoning for the Python backends (the native ones read the environment once)."""
    global _poison
    _poison = bool(on)


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty``, or a poisoned one in the debug mode."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    if _poison:
        t.fill_(float("nan") if t.is_floating_point() else POISON_INT)
    return t
