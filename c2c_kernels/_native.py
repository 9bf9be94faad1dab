"""Loads the compiled extension (``c2c_kernels._C``), which registers ``torch.ops.c2c_native``."""
from __future__ import annotations

_error: str | None = None
try:
    from . import _C  # noqa: F401
except ImportError as e:  # not built: the pure-Python backends still work
    _error = f"the native extension c2c_kernels._C is not built ({e}); run `pip install --no-build-isolation -e .`"


def unavailable() -> str | None:
    return _error


def has_cuda_kernels() -> bool:
    import torch
    # python/cuda_ops.cpp registers the CUDA kernels of the c2c_native ops when the extension
    # was compiled with CUDA; ask the dispatcher rather than probing for an op name.
    return _error is None and torch._C._dispatch_has_kernel_for_dispatch_key("c2c_native::fuse", "CUDA")
