"""The native CPU backend (``csrc/cpu``): fused gather, norms, activations and merge around
ATen GEMMs, multi-threaded. Needs the compiled extension ``c2c_kernels._C``."""
from __future__ import annotations

DEVICES = ("cpu",)


def unavailable():
    from .. import _native
    return _native.unavailable()


def fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers):
    import torch
    torch.ops.c2c_native.fuse_cpu(receiver_caches, sharer_caches, receiver_slots, sharer_slots,
                                  list(weights), fusers)
