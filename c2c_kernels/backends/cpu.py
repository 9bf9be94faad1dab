"""The native CPU backend (``csrc/cpu``): fused gather, norms, activations and merge around
ATen GEMMs, multi-threaded. Needs the compiled extension ``c2c_kernels._C``."""
from __future__ import annotations

import torch

from .. import _native

DEVICES = ("cpu",)


def unavailable():
    return _native.unavailable()


def fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers):
    torch.ops.c2c_native.fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, list(weights), fusers)


def project(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers):
    return torch.ops.c2c_native.project(receiver_caches, sharer_caches, receiver_slots, sharer_slots,
                                        list(weights), fusers)


def merge(receiver_caches, receiver_slots, projections, head_scales):
    torch.ops.c2c_native.merge(receiver_caches, receiver_slots, projections, head_scales)
