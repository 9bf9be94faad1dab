"""The reference backend: :mod:`c2c_kernels.reference` behind the backend interface.

Runs on any device; syncs with the host (boolean masks), so not CUDA-graph capturable.
"""
from ..reference import fuse, merge, project  # noqa: F401

DEVICES = ("cpu", "cuda", "meta")
# No AUTO entry: the registry's FALLBACK, auto's last resort on every device type.


def unavailable():
    return None
