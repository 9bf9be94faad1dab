"""Backends: each computes the ops on already-validated arguments, in its own module.

A backend module defines ``DEVICES`` (device types it runs on), ``unavailable()`` (``None``
when usable, else the reason), and ``fuse``, ``project``, ``merge`` with the signatures of
:mod:`c2c_kernels.reference`. It may omit ``project``/``merge``; the reference ones are used
then. Adding a backend is a module here plus one line in ``_MODULES``.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

# name -> module; "auto" tries names in the order of AUTO_ORDER for the device type.
_MODULES = {
    "reference": "c2c_kernels.backends.reference",
    "cpu": "c2c_kernels.backends.cpu",
    "triton": "c2c_kernels.backends.triton",
    "cuda": "c2c_kernels.backends.cuda",
    # The CUDA sources run on the CPU, for tests: opt-in, never "auto", not in available().
    "cuda_emulator": "c2c_kernels.backends.cuda_emulator",
}
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}
NAMES = ("auto", *_MODULES)

_loaded: dict[str, ModuleType | str] = {}


def _load(name: str) -> ModuleType | str:
    """The backend module, or a string saying why it cannot be used."""
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
            reason = module.unavailable()
            _loaded[name] = module if reason is None else reason
        except ImportError as e:
            _loaded[name] = f"cannot be imported ({e})"
    return _loaded[name]


def available(device_type: str | None = None, *, emulators: bool = False) -> list[str]:
    """Names of the usable backends (for ``device_type``, if given); emulators only if asked."""
    out = []
    for name in _MODULES:
        if not emulators and name == "cuda_emulator":
            continue
        module = _load(name)
        if not isinstance(module, str) and (device_type is None or device_type in module.DEVICES):
            out.append(name)
    return out


def resolve(name: str, device: torch.device) -> ModuleType:
    """The backend module for ``name`` on ``device``; raises a clear error when it can't run."""
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("reference",)):
            module = _load(candidate)
            if not isinstance(module, str) and device.type in module.DEVICES:
                return module
        return _load("reference")
    if name not in _MODULES:
        raise ValueError(f"backend: expected one of {list(NAMES)}, got {name!r}")
    module = _load(name)
    if isinstance(module, str):
        raise RuntimeError(f"backend {name!r} is not available: {module}")
    if device.type not in module.DEVICES:
        raise ValueError(f"backend {name!r} runs on {list(module.DEVICES)} tensors; the caches are on {device}")
    return module
