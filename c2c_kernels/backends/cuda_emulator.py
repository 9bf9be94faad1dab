"""The CUDA backend's own sources (``csrc/cuda``: host code, kernels, launch configurations)
compiled for the CPU emulator of ``csrc/cuda/emulator``, so that they are tested on machines
without a GPU. Every CUDA thread runs as a fiber and blocks run one after another: correct,
and thousands of times slower than anything else here, so ``auto`` never picks it and
benchmarks leave it out.

Opt in with ``C2C_CUDA_EMULATOR=1`` (the test suite does). The first use builds it with
``torch.utils.cpp_extension`` into ``build/cuda_emulator`` of the source tree (a few minutes
on two cores, then cached), so it needs a source checkout and a C++ compiler, no CUDA toolkit.
Slots go through the same ``prepare_slots`` kernel as on the GPU (see ``backends/cuda.py``), with
the status buffer of the CPU device.
"""
from __future__ import annotations

import os
from pathlib import Path

from .. import status
from .cuda import prepared

DEVICES = ("cpu",)
EMULATOR = True  # test-only: never auto, left out of backends.available() and the benchmarks

_ROOT = Path(__file__).resolve().parents[2]
_SOURCES = ["python/cuda_emulator.cpp", "csrc/cuda/emulator/emulator.cpp", "csrc/cuda/emulator/selftest.cpp",
            *(f"csrc/cuda/emulator/{name}.cpp" for name in ("batched_linear", "fuse", "gather_norm", "merge",
                                                             "merge_op", "prepare_slots"))]
_module = None


def _build():
    global _module
    if _module is None:
        from torch.utils import cpp_extension
        # -fno-strict-aliasing: the kernels move 16-byte words through uint4 casts.
        flags = ["-O2", "-DC2C_CUDA_EMULATOR", "-fno-strict-aliasing", "-Wno-unknown-pragmas"]
        sanitizer = []
        name = "c2c_cuda_emulator"
        if os.environ.get("C2C_CUDA_EMULATOR_ASAN") == "1":  # see scripts/asan_cuda_emulator.sh
            sanitizer = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
            name += "_asan"
        build = _ROOT / "build" / name
        build.mkdir(parents=True, exist_ok=True)
        _module = cpp_extension.load(
            name=name, sources=[str(_ROOT / s) for s in _SOURCES], extra_include_paths=[str(_ROOT / "csrc")],
            extra_cflags=flags + sanitizer, extra_ldflags=sanitizer,
            build_directory=str(build), with_cuda=False, verbose=False)
    return _module


def unavailable():
    if os.environ.get("C2C_CUDA_EMULATOR") != "1":
        return "opt-in: set C2C_CUDA_EMULATOR=1 to build and use it (it runs the CUDA sources on the CPU, slowly)"
    missing = [s for s in _SOURCES if not (_ROOT / s).exists()]
    if missing:
        return f"needs a source checkout: {missing[0]} is missing"
    try:
        _build()
    except Exception as e:  # a failed build is reported as the reason, never raised at import
        lines = str(e).strip().splitlines() or [repr(e)]
        errors = [line.strip() for line in lines if "error" in line.lower()]
        return f"the emulator build failed: {(errors or lines)[0]}"
    return None


def prepare(receiver_slots, sharer_slots, receiver_rows: int, sharer_rows: int, *, dedupe: bool):
    """The ``prepare_slots`` kernel on the emulator (see ``backends/cuda.py``)."""
    return tuple(_build().prepare_slots(receiver_slots, sharer_slots, receiver_rows, sharer_rows, dedupe,
                                        status.buffer(receiver_slots.device)))


def fuse(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers):
    r, s = prepared(prepare, receiver_caches, sharer_caches, receiver_slots, sharer_slots, dedupe=True)
    _build().fuse(list(receiver_caches), list(sharer_caches), r, s, list(weights), list(fusers))


def project(receiver_caches, sharer_caches, receiver_slots, sharer_slots, weights, fusers):
    r, s = prepared(prepare, receiver_caches, sharer_caches, receiver_slots, sharer_slots, dedupe=False)
    return tuple(_build().project(list(receiver_caches), list(sharer_caches), r, s, list(weights), list(fusers)))


def selftest(name: str, blocks: int = 1, threads: int = 32) -> list[float]:
    """Runs one of the emulator's own test kernels (csrc/cuda/emulator/selftest.cpp)."""
    return _build().selftest(name, blocks, threads)


def chunk_plan(entries: int, tokens: int, sharer_width: int, receiver_width: int, hidden: int, inner: int,
               heads: int, element_size: int, device_memory: int, head_fold: bool = True) -> tuple[int, int, int]:
    """(tokens per chunk, chunks, workspace bytes) of a fuse / project call of these shapes on a
    device of ``device_memory`` bytes: the CUDA host code's own sizing (csrc/cuda/fuse.cu).
    ``head_fold=False``: a call whose weight branch runs unfolded (it needs the ``w`` buffer)."""
    return tuple(_build().chunk_plan(entries, tokens, sharer_width, receiver_width, hidden, inner, heads,
                                     element_size, device_memory, head_fold))


def head_fold_cache_entries() -> int:
    """Pairs of weight stacks (``w_head``, ``head_w2``) whose head fold ``[W_head, W_head W2h]``
    (fp32) the CUDA host code keeps (live ones only); ``C2C_CUDA_HEAD_FOLD=0`` runs the weight
    branch unfolded (read per call)."""
    return _build().head_fold_cache_entries()


def captured_derived_tensors() -> int:
    """Derived weight tensors (concatenated W_in, head folds) the host code keeps alive because a
    CUDA-graph capture used them: a graph replays their addresses after their cache entry went."""
    return _build().captured_derived_tensors()


def set_emulated_capture(on: bool) -> None:
    """Tests: stand in for a CUDA-graph capture, so the host code takes its capture paths."""
    _build().set_emulated_capture(bool(on))


def merge(receiver_caches, receiver_slots, projections, head_scales):
    receiver_slots, _ = prepared(prepare, receiver_caches, None, receiver_slots, None, dedupe=True)
    _build().merge(list(receiver_caches), receiver_slots, list(projections), list(head_scales))
