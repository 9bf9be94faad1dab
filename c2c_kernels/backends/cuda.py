"""The CUDA C++ backend (``csrc/cuda``): gather, bias/RMSNorm/GELU epilogues and the gated
merge as hand-written kernels around strided-batched cuBLAS GEMMs (through ATen), every stage
batched over all fusers of a call: one input GEMM over the gathered ``[S; X]`` rows, a residual
stream in the cache dtype that each FFN's second GEMM adds into, the weight branch's second GEMM
folded into the head weights (``V = W_head W2h``, fp32, cached per weight stack pair;
``C2C_CUDA_HEAD_FOLD=0``, read per call, runs it unfolded), token chunks sized from the
device's memory (``docs/cuda.md``: bytes and launches per stage). Current-stream, no host
synchronisation (the hard gate is read on the device), CUDA-graph capturable. Needs
``c2c_kernels._C`` built with CUDA.

Slots: every call first runs ``c2c_native.prepare_slots`` (one launch), which applies the rules
of :mod:`c2c_kernels.slots` on the device (any slot dtype and stride in; out-of-range slots
skipped and recorded in :func:`c2c_kernels.status.buffer`; duplicated receiver slots: the last
valid token writes), and the kernels run on its contiguous int64 slots.
"""
from __future__ import annotations

import torch

from .. import _native, slots, status

DEVICES = ("cuda",)
AUTO = {"cuda": 1}  # auto's second choice on a GPU, after Triton


def unavailable():
    reason = _native.unavailable()
    if reason is not None:
        return reason
    if not _native.has_cuda_kernels():
        return ("the native extension c2c_kernels._C was built without CUDA kernels (torch without CUDA, "
                "no CUDA toolkit found, or C2C_NO_CUDA=1); rebuild with `pip install --no-build-isolation -e .`")
    if not _has_prepare_slots():
        return ("the native extension c2c_kernels._C predates c2c_native::prepare_slots (the slot checks every "
                "call runs first); rebuild it with `pip install --no-build-isolation -e .`")
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def _has_prepare_slots() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("c2c_native::prepare_slots", "CUDA")
    except RuntimeError:  # the op was never defined
        return False


def prepare(receiver_slots, sharer_slots, receiver_rows: int, sharer_rows: int, *, dedupe: bool):
    """``slots.prepare()``'s (receiver, sharer) slots, computed on the device without a host sync;
    errors go to the status buffer of the slots' device."""
    return torch.ops.c2c_native.prepare_slots(receiver_slots, sharer_slots, receiver_rows, sharer_rows, dedupe,
                                              status.buffer(receiver_slots.device))


def prepared(prepare, receiver_caches, sharer_caches, receiver_slots, sharer_slots, *, dedupe):
    """The slots the kernels run on: ``prepare`` (this module's, or the emulator build's) over the
    pools' row counts; ``sharer_caches=None`` for merge (no sharer read)."""
    if not receiver_caches:  # nothing is addressed; the native op returns its empty result
        return receiver_slots, sharer_slots
    sharer_rows = slots.rows(sharer_caches[0]) if sharer_caches is not None else 0
    return prepare(receiver_slots, sharer_slots, slots.rows(receiver_caches[0]), sharer_rows, dedupe=dedupe)


def fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers):
    r, s = prepared(prepare, receiver_caches, sharer_caches, receiver_slots, sharer_slots, dedupe=True)
    torch.ops.c2c_native.fuse(receiver_caches, sharer_caches, r, s, list(weights), list(fusers))


def project(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers):
    r, s = prepared(prepare, receiver_caches, sharer_caches, receiver_slots, sharer_slots, dedupe=False)
    return torch.ops.c2c_native.project(receiver_caches, sharer_caches, r, s, list(weights), list(fusers))


def merge(receiver_caches, receiver_slots, projections, head_scales):
    receiver_slots, _ = prepared(prepare, receiver_caches, None, receiver_slots, None, dedupe=True)
    torch.ops.c2c_native.merge(receiver_caches, receiver_slots, projections, head_scales)
