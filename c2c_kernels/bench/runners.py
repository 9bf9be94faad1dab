"""The contenders of a benchmark: the research-style eager fuser, ``torch.compile`` of it, and
every backend of ``c2c.fuse_all``; each becomes a zero-argument call on prepared inputs.

Before a contender is timed its output is checked against the fp32 reference on a clean copy
of the receiver cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import backends
from ..api import fuse_all
from ..eager import EagerC2C
from ..testing import TOLERANCES
from . import timing
from .workloads import Inputs

EAGER = "eager"
COMPILED = "compile"


def registry_backends(device_type: str, include_reference: bool = False) -> list[str]:
    """The usable ``fuse_all`` backends for a device type; "reference" only when asked (slow)."""
    return [name for name in backends.available(device_type) if include_reference or name != "reference"]


def default_contenders(device_type: str, include_reference: bool = False) -> list[str]:
    return [EAGER, COMPILED, *registry_backends(device_type, include_reference)]


def known_contenders() -> list[str]:
    return [EAGER, COMPILED, *backends.names()]


_models: dict = {"weights": None}  # models of the current weights only: old ones can be freed


def _allow_recompiles() -> None:
    """Each (workload, dtype) is its own compiled graph of one shared forward; dynamo's default
    limit of 8 would silently fall back to eager in a long run."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))


def _model(name: str, inputs: Inputs) -> EagerC2C:
    weights = inputs.ckpt.weights
    if _models["weights"] is not weights.w_in_sharer:
        _models.clear()
        _models["weights"] = weights.w_in_sharer
    if name not in _models:
        model = EagerC2C(inputs.ckpt)
        if name == COMPILED:
            # Compile each fuser module, not the whole layer loop: every layer shares one graph
            # (weights are graph inputs), so the compile takes seconds rather than minutes.
            _allow_recompiles()
            for fuser in model.fusers:
                fuser.compile(dynamic=True)
        _models[name] = model
    return _models[name]


def make_call(name: str, inputs: Inputs, receiver=None) -> Callable[[], object]:
    """A call of contender ``name``; registry backends fuse into ``receiver`` (default: the
    inputs' working cache), eager ones return new tensors and leave every cache alone."""
    if name in (EAGER, COMPILED):
        model = _model(name, inputs)
        receiver_hf, sharer_hf = inputs.hf_inputs(receiver)
        return lambda: model(receiver_hf, sharer_hf)
    receiver = receiver or inputs.receiver
    return lambda: fuse_all(inputs.ckpt, receiver.kv, inputs.sharer.kv, inputs.receiver_slots,
                            inputs.sharer_slots, backend=name)


def _rows(name: str, inputs: Inputs, receiver, output) -> list[torch.Tensor]:
    """Fused rows ``[tokens, heads, dim]`` (fp32) of every fuser, K then V per layer."""
    if name in (EAGER, COMPILED):
        return [t.transpose(1, 2).reshape(inputs.total_tokens, *t.shape[1::2]).float()
                for kv in output for t in kv]
    slots = inputs.receiver_slots.long()
    return [view[slots // view.shape[1], slots % view.shape[1]].float() for kv in receiver.kv for view in kv]


def fused_rows(name: str, inputs: Inputs) -> tuple[list[torch.Tensor], float]:
    """Run ``name`` once on a clean receiver copy: its fused rows and the call's wall time in
    seconds (the first call of a shape: compiles and autotuning included)."""
    receiver = inputs.fresh_receiver()
    sample = timing.measure(make_call(name, inputs, receiver), inputs.device)
    return _rows(name, inputs, receiver, sample.result), sample.wall_s


@dataclass
class Check:
    correct: bool
    max_abs_err: float
    tolerance: float


def compare(got: list[torch.Tensor], want: list[torch.Tensor], dtype: torch.dtype) -> Check:
    """``|got - want| <= tol * (1 + |want|)`` everywhere, with the test suite's tolerance."""
    tol = TOLERANCES[dtype]
    worst, ok = 0.0, True
    for g, w in zip(got, want):
        diff = (g - w).abs()
        worst = max(worst, float(diff.max())) if diff.numel() else worst
        ok = ok and bool((diff <= tol * (1 + w.abs())).all()) and bool(torch.isfinite(g).all())
    return Check(ok and len(got) == len(want), worst, tol)
