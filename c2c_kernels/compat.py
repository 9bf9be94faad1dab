"""Which torch versions run the package, and what each one cannot do.

Supported: torch >= 2.11 (declared in setup.py). Eager calls work on every supported version.
torch.compile's inductor backend on torch 2.11 and 2.12 miscompiles a custom op that writes into
a list of tensors when two of them share a storage (a paged cache's K and V views, or the
layers of one pool): it clones the shared storage starting at the wrong view's address, so it
reads past the end of the view and copies garbage back (found with ``c2c::fuse`` on the hf and
vLLM layouts; torch 2.13.0 and 2.14.1 are right, and so is the ``aot_eager`` backend). The ops
that write into caches therefore refuse inductor on those versions with a clear error rather
than return wrong caches.
"""
from __future__ import annotations

import re

import torch

MIN_TORCH = (2, 11)
# [first, last] torch (major, minor) whose inductor miscompiles in-place ops on tensor lists.
INDUCTOR_LIST_MUTATION_BROKEN = ((2, 11), (2, 12))


def major_minor(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of a version string (default: the installed torch): '2.11.0+cu130' -> (2, 11)."""
    text = torch.__version__ if version is None else version
    match = re.match(r"(\d+)\.(\d+)", str(text))
    if match is None:
        raise ValueError(f"version: expected 'MAJOR.MINOR...', got {text!r}")
    return int(match.group(1)), int(match.group(2))


def inductor_list_mutation_broken(version: str | None = None) -> bool:
    first, last = INDUCTOR_LIST_MUTATION_BROKEN
    return first <= major_minor(version) <= last


def inductor_refusal(op: str, version: str | None = None) -> str:
    """The error message for compiling ``op`` with inductor on a torch that miscompiles it."""
    return (f"{op}: torch.compile's inductor backend miscompiles this in-place op on torch "
            f"{major_minor(version)[0]}.{major_minor(version)[1]} (it copies cache views that share a "
            f"storage from the wrong address and writes garbage back); use torch >= 2.13, or "
            f"torch.compile(backend='aot_eager'), or call it outside the compiled region")


def refuse_inductor_on_broken_torch(op) -> None:
    """Make inductor's lowering of ``op`` (an OpOverload that writes into a tensor list) raise
    :func:`inductor_refusal` on the torch versions that miscompile it; a no-op elsewhere.

    Call it from the op's fake (meta) implementation: that runs whenever torch.compile traces
    the op, before inductor lowers it, and never in eager calls. Eager mode, ``aot_eager`` and
    ``torch.export`` are not affected (only inductor lowers through this table)."""
    if not inductor_list_mutation_broken():
        return
    from torch._inductor.lowering import lowerings, register_lowering  # only imported while compiling

    if getattr(lowerings.get(op), "_c2c_refusal", False):
        return
    message = inductor_refusal(op.name())

    def refuse(*args, **kwargs):
        raise RuntimeError(message)

    refuse._c2c_refusal = True
    register_lowering(op)(refuse)


def triton_interpreter_problem() -> str | None:
    """Why the Triton interpreter cannot run here, or None. triton 3.6's interpreter calls
    ``int()`` on one-element numpy arrays, which numpy >= 2.4 rejects ("only 0-dimensional
    arrays can be converted to Python scalars"); triton 3.8 is fine with numpy 2.4."""
    try:
        import numpy
        import triton
    except ImportError as exc:
        return f"the Triton interpreter needs {exc.name}"
    if major_minor(triton.__version__) < (3, 8) and major_minor(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter fails under numpy {numpy.__version__} "
                f"(int() of a one-element array): install numpy<2.4")
    return None
