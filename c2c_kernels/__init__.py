"""c2c-kernels: fast Cache-to-Cache fusion on KV caches, in place, in their own layouts.

    import c2c_kernels as c2c
    ckpt = c2c.load_checkpoint(path, device="cuda", dtype=torch.bfloat16)
    c2c.fuse_all(ckpt, receiver_kv, sharer_kv, receiver_slots, sharer_slots)
"""
from . import layouts, reference
from .api import fuse, fuse_all, merge, project
from .backends import available as available_backends
from .status import raise_pending_errors
from .checkpoint import (Checkpoint, CheckpointError, FusedLayer, FuserParams, last_aligned_map,
                         load_checkpoint, make_checkpoint, save_checkpoint)
from .weights import FuserWeights, random_weights

__version__ = "0.1.0"


def __getattr__(name):
    # Training pulls in autograd machinery and Triton kernels: load it on first use only.
    if name == "FuserTrainer":
        from .training import FuserTrainer
        return FuserTrainer
    if name == "distributed":  # torch.distributed machinery: also on first use only
        import importlib
        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module 'c2c_kernels' has no attribute {name!r}")

__all__ = [
    "fuse", "fuse_all", "project", "merge", "load_checkpoint", "save_checkpoint", "make_checkpoint",
    "last_aligned_map", "Checkpoint", "CheckpointError", "FusedLayer", "FuserParams", "FuserWeights",
    "random_weights", "available_backends", "raise_pending_errors", "layouts", "reference", "FuserTrainer",
    "distributed",
]
