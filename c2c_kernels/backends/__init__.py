"""Backends: each computes the ops on already-validated arguments, in its own module.

A backend module declares its metadata at the top, before any import that may fail:

- ``DEVICES``: device types it runs on in this process;
- ``TARGETS`` (optional, default ``DEVICES``): device types it is built for in some
  configuration (Triton: CUDA, or the CPU in the interpreter); the test matrix lists a backend
  on each of them and skips, with the reason, where it cannot run here;
- ``AUTO`` (optional, default none): ``{device type: rank}``, where ``auto`` may pick it, lower
  ranks tried first;
- ``EMULATOR`` (optional, default False): a test-only backend (slow), never picked by ``auto``,
  left out of :func:`available` and of the benchmarks unless asked;

and defines ``unavailable()`` (``None`` when usable, else the reason) and ``fuse``, ``project``,
``merge`` with the signatures of :mod:`c2c_kernels.reference`. It may omit ``project``/``merge``;
the reference ones are used then (:func:`implements` says which ops a backend has itself).

Adding a backend is a module here plus one entry in ``REGISTRY``; the op layer, ``c2c-bench``,
the test matrix (:func:`test_matrix`) and the microbenchmarks find it from there.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple

import torch

# name -> module, in the order the test matrix and listings use.
REGISTRY = {
    "reference": "c2c_kernels.backends.reference",
    "cpu": "c2c_kernels.backends.cpu",
    "triton": "c2c_kernels.backends.triton",
    "cuda": "c2c_kernels.backends.cuda",
    "cuda_emulator": "c2c_kernels.backends.cuda_emulator",
}
NAMES = ("auto", *REGISTRY)
OPS = ("fuse", "project", "merge")
# The last resort of "auto" (it runs on every device type).
FALLBACK = "reference"


class BackendUnavailable(RuntimeError):
    """A registered backend that cannot run in this process; the message says why."""


class MatrixEntry(NamedTuple):
    backend: str
    device: str
    skip: str | None  # why this pair cannot run here; None when it can


_imported: dict[str, ModuleType | str] = {}
_loaded: dict[str, ModuleType | str] = {}
_auto: dict[str, tuple[str, ...]] = {}


def _check_name(name: str) -> None:
    if name not in REGISTRY:
        raise ValueError(f"backend: expected one of {['auto', *REGISTRY]}, got {name!r}")


def _import(name: str) -> ModuleType | str:
    """The module with its metadata (``unavailable()`` not called), or why it failed to import."""
    if name not in _imported:
        try:
            _imported[name] = importlib.import_module(REGISTRY[name])
        except ImportError as e:
            _imported[name] = f"cannot be imported ({e})"
    return _imported[name]


def _load(name: str) -> ModuleType | str:
    """The backend module, or a string saying why it cannot be used (private: use :func:`get`
    or :func:`reason`)."""
    if name not in _loaded:
        module = _import(name)
        if not isinstance(module, str):
            why = module.unavailable()
            module = module if why is None else why
        _loaded[name] = module
    return _loaded[name]


def names(*, emulators: bool = True) -> list[str]:
    """Every registered backend name (not ``auto``), usable here or not."""
    return [n for n in REGISTRY if emulators or not is_emulator(n)]


def reason(name: str) -> str | None:
    """``None`` when backend ``name`` can run in this process, else why not (its first use may
    build it: the CUDA emulator compiles itself here)."""
    _check_name(name)
    module = _load(name)
    return module if isinstance(module, str) else None


def get(name: str) -> ModuleType:
    """The module of backend ``name``; raises :class:`BackendUnavailable` with the reason when it
    cannot run here, ``ValueError`` for an unknown name."""
    _check_name(name)
    module = _load(name)
    if isinstance(module, str):
        raise BackendUnavailable(f"backend {name!r} is not available: {module}")
    return module


def is_emulator(name: str) -> bool:
    """Whether ``name`` is a test-only backend (metadata only: nothing is built)."""
    _check_name(name)
    module = _import(name)
    return not isinstance(module, str) and bool(getattr(module, "EMULATOR", False))


def devices(name: str) -> tuple[str, ...]:
    """Device types ``name`` runs on in this process (metadata only)."""
    _check_name(name)
    module = _import(name)
    return () if isinstance(module, str) else tuple(module.DEVICES)


def targets(name: str) -> tuple[str, ...]:
    """Device types ``name`` is built for in some configuration (metadata only)."""
    _check_name(name)
    module = _import(name)
    return () if isinstance(module, str) else tuple(getattr(module, "TARGETS", module.DEVICES))


def implements(name: str, op: str) -> bool:
    """Whether backend ``name`` has ``op`` itself (else the op layer runs the reference's)."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {list(OPS)}, got {op!r}")
    _check_name(name)
    module = _import(name)
    return not isinstance(module, str) and callable(getattr(module, op, None))


def auto_order(device_type: str) -> tuple[str, ...]:
    """The backends ``auto`` tries on ``device_type``, in order (from each module's ``AUTO``),
    ending with the fallback."""
    if device_type not in _auto:
        ranked = []
        for n in REGISTRY:
            module = _import(n)
            rank = None if isinstance(module, str) else getattr(module, "AUTO", {}).get(device_type)
            if rank is not None and not getattr(module, "EMULATOR", False):
                ranked.append((rank, n))
        order = [n for _, n in sorted(ranked)]
        _auto[device_type] = (*order, *([FALLBACK] if FALLBACK not in order else []))
    return _auto[device_type]


def available(device_type: str | None = None, *, emulators: bool = False) -> list[str]:
    """Names of the usable backends (for ``device_type``, if given); emulators only if asked."""
    out = []
    for name in names(emulators=emulators):
        module = _load(name)
        if not isinstance(module, str) and (device_type is None or device_type in module.DEVICES):
            out.append(name)
    return out


def test_matrix(device_types=("cpu", "cuda"), *, include_reference: bool = True,
                emulators: bool = True, op: str | None = None) -> list[MatrixEntry]:
    """``(backend, device, skip reason)`` for every registered backend on every device type it
    targets (``device_types`` order, then registry order). Pairs that cannot run here are kept
    with the reason, so a test report says what did not run and why. ``op``: only backends that
    implement it themselves."""
    out = []
    gpu = torch.cuda.is_available()
    for device in device_types:
        for name in names(emulators=emulators):
            if name == FALLBACK and not include_reference:
                continue
            module = _import(name)
            if not isinstance(module, str) and device not in targets(name):
                continue
            if op is not None and not isinstance(module, str) and not implements(name, op):
                continue
            skip = None
            if device == "cuda" and not gpu:
                skip = "no GPU"
            elif reason(name) is not None:
                skip = reason(name)
            elif device not in devices(name):
                skip = f"{name} does not run on {device}"
            out.append(MatrixEntry(name, device, skip))
    return out


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module for ``name`` on ``device``; raises a clear error when it can't run."""
    if name == "auto":
        for candidate in auto_order(device.type):
            module = _load(candidate)
            if not isinstance(module, str) and device.type in module.DEVICES:
                return module
        return _load(FALLBACK)
    _check_name(name)
    module = _load(name)
    if isinstance(module, str):
        raise BackendUnavailable(f"backend {name!r} is not available: {module}")
    if device.type not in module.DEVICES:
        raise ValueError(f"backend {name!r} runs on {list(module.DEVICES)} tensors; the caches are on {device}")
    return module


test_matrix.__test__ = False  # a builder of test parameters, not a test: pytest must not collect it
