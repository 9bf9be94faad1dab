"""The Triton backend: the whole fuser forward in ``2 * num_blocks + 4`` launches per call.

Every entry of a call (K and V of every layer) goes through each stage in the same launch: the
weights are stacked over fusers and each program looks its fuser up in a small per-call device
table, which also carries each entry's cache addresses and strides (tables.py). A small first
launch prepares the slots (slot_prep.py: every slot inside its pool, a bad one recorded in the
device's status buffer, duplicates resolved); the first GEMM gathers the rows from the caches
through them and the last one merges into them in place (pipeline.py has the stage list). No
host synchronisation anywhere, so a call (after one eager warm-up call with the same shapes, for
the autotuner) can be captured in a CUDA graph, the parallel multi-sharer mode (project, then
merge) included: a table first met during the capture is written by launches the graph records.

Runs on CUDA tensors, and on CPU tensors in the Triton interpreter (``TRITON_INTERPRET=1`` set
before import), which is how it is tested without a GPU.
"""
from __future__ import annotations

import os

import torch

from ... import workspace

try:
    import triton  # noqa: F401
    _error = None
except ImportError as e:  # the other backends still work
    _error = f"triton cannot be imported ({e})"


def interpreting() -> bool:
    """Whether Triton runs its kernels in the interpreter on the CPU (``TRITON_INTERPRET=1``, set
    by the test suite on machines without a GPU). The one place the variable is read; Triton
    itself reads it when a kernel is defined, so it must be set before any import of kernels."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The interpreter dereferences the tables' addresses on the host: CPU tensors only there.
DEVICES = ("cpu",) if interpreting() else ("cuda",)
TARGETS = ("cpu", "cuda")  # the test matrix lists both and skips the one this process cannot run
AUTO = {"cuda": 0}  # auto's first choice on a GPU (never on the CPU: the interpreter is slow)


def unavailable():
    if _error is None and interpreting():
        from ...compat import triton_interpreter_problem
        return triton_interpreter_problem()
    return _error


def prepare(receiver_slots, sharer_slots, receiver_rows: int, sharer_rows: int, *, dedupe: bool):
    """The slot kernel every call runs first (slot_prep.py): ``slots.prepare()``'s slots on the
    device, errors recorded in the status buffer without a host sync."""
    from . import slot_prep
    return slot_prep.prepare(receiver_slots, sharer_slots, receiver_rows, sharer_rows, dedupe=dedupe)


def fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers):
    from . import pipeline
    pipeline.run(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers)


def project(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers):
    entries, tokens = len(fusers), receiver_slots.shape[0]
    device = receiver_slots.device
    # Every element is written (zero rows for skipped tokens): poisoned in the debug mode to prove it.
    projection = workspace.empty(entries, tokens, weights.receiver_width, dtype=torch.float32, device=device)
    head_scale = workspace.empty(entries, tokens, weights.receiver_heads, dtype=torch.float32, device=device)
    if entries and tokens:
        from . import pipeline
        pipeline.run(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers,
                     projection=projection, head_scale=head_scale)
    return projection, head_scale


def merge(receiver_caches, receiver_slots, projections, head_scales):
    from . import pipeline
    pipeline.merge(receiver_caches, receiver_slots, projections, head_scales)
